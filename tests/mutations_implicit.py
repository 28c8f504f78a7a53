"""Break implicit chain of thought on purpose, one breakage at a time, and check that a test fails on
an assertion (not on an exception another breakage would raise).

  .venv/bin/python tests/mutations_implicit.py [--only NAME,...] [--list] [--control]

The runner: tests/mutation_runner.py (a scratch copy of the tree; prints caught / SURVIVED)."""
from __future__ import annotations

import sys

from mutation_runner import main

T = "tests/test_implicit.py::"
EMULATOR, STATES, DECODE = (
    "engine/distill/implicit/emulator.py",
    "engine/distill/implicit/states.py",
    "engine/distill/implicit/decode.py",
)
HEAD_TESTS = [T + "test_emulator_head_against_the_authors_loop"]

# name: (file, code, its replacement, tests that must fail)
MUTATIONS = {
    "write-back added instead of replacing": (
        EMULATOR,
        "return h.index_put((self.rows, self.positions), write.to(h.dtype))",
        "return h.index_put((self.rows, self.positions), write.to(h.dtype), accumulate=True)",
        HEAD_TESTS,
    ),
    "write-back of the prediction f instead of out_proj([o; c])": (
        EMULATOR,
        "write = head.out_proj(torch.cat((output, self.context), dim=-1))",
        "write = head.out_proj(torch.cat((output, self.context), dim=-1)) * 0 + f",
        HEAD_TESTS,
    ),
    "attention scaled by 1/sqrt(d)": (
        EMULATOR,
        "scores = torch.bmm(self.keys, head.query_proj(output).unsqueeze(-1))",
        "scores = torch.bmm(self.keys, head.query_proj(output).unsqueeze(-1)) / output.shape[-1] ** 0.5",
        HEAD_TESTS,
    ),
    "attention over the current layer too": (
        EMULATOR,
        "        if self.keys is not None:  # lines 216-222",
        "        self.keys = key.unsqueeze(1) if self.keys is None else torch.cat((self.keys, key.unsqueeze(1)), 1)\n"
        "        if self.keys is not None:  # lines 216-222",
        HEAD_TESTS,
    ),
    "LSTM input without the context": (
        EMULATOR,
        "head.rnn((f + self.context).unsqueeze(0), self.rnn_state)",
        "head.rnn(f.unsqueeze(0), self.rnn_state)",
        HEAD_TESTS,
    ),
    "mixture temperature ignored": (
        EMULATOR,
        "(z @ weight.T / self.softmax_temperature).softmax(dim=-1) @ weight",
        "(z @ weight.T).softmax(dim=-1) @ weight",
        HEAD_TESTS,
    ),
    "LayerNorm off by default": (
        STATES,
        '        if self.norm == "none":\n            return z',
        "        return z",
        [T + "test_state_injection_against_a_hand_computation", T + "test_emulator_loss_against_the_authors"],
    ),
    "LayerNorm with eps 1e-6": (
        STATES,
        "return F.layer_norm(z.float(), (z.shape[-1],), eps=1e-5)",
        "return F.layer_norm(z.float(), (z.shape[-1],), eps=1e-6)",
        [T + "test_state_injection_against_a_hand_computation", T + "test_emulator_loss_against_the_authors"],
    ),
    "emulator loss without the 1/2": (
        "engine/distill/implicit/tasks.py",
        'return {"state": error / 2 if self.authors else error}',
        'return {"state": error}',
        [T + "test_emulator_loss_against_the_authors"],
    ),
    "diagonal rounds the offset only": (
        STATES,
        "return tuple(torch.round(first + layer_ids * step).clamp(max=last).long().tolist())",
        "return tuple((first + torch.round(layer_ids * step)).clamp(max=last).long().tolist())",
        [T + "test_diagonal_and_layer_mapping_by_hand"],
    ),
    "diagonal in float64": (
        STATES,
        "step = (last - first) / (n_layers - 1)  # a float32 tensor",
        "step = (last - first).double() / (n_layers - 1)  # a float32 tensor",
        [T + "test_diagonal_and_layer_mapping_by_hand"],
    ),
    "diagonal not clamped to s2": (
        STATES,
        "torch.round(first + layer_ids * step).clamp(max=last)",
        "torch.round(first + layer_ids * step)",
        [T + "test_diagonal_and_layer_mapping_by_hand"],
    ),
    "best/ ties not broken (accuracy only)": (
        DECODE,
        '        key = (result["accuracy"], result["word_accuracy"])\n',
        '        return (result["accuracy"],)\n        key = ()\n',
        [T + "test_best_breaks_accuracy_ties_by_digits_then_loss"],
    ),
    "best/ ties by digits, the loss the wrong way": (
        DECODE,
        'key + (-result["held_out_loss"],)',
        'key + (result["held_out_loss"],)',
        [T + "test_best_breaks_accuracy_ties_by_digits_then_loss"],
    ),
    "trainer compares the first rank entry only": (
        "engine/train/trainer.py",
        "better = self.best_key is None or key > self.best_key",
        "better = self.best_key is None or key[0] > self.best_key[0]",
        [T + "test_best_breaks_accuracy_ties_by_digits_then_loss"],
    ),
    "--state_norm ignored": (
        "engine/distill/implicit/stages.py",
        "return StateSpec(delta=args.delta, subset=args.subset, norm=args.state_norm)",
        "return StateSpec(delta=args.delta, subset=args.subset)",
        [T + "test_readout_emulator_and_old_directories"],
    ),
    "--mixture_size ignored": (
        "engine/distill/implicit/stages.py",
        "            args.mixture_size,\n",
        "            1,\n",
        [T + "test_lora_stages_continue_their_adapters"],
    ),
}


if __name__ == "__main__":
    sys.exit(main([(name, path, old, new, tests) for name, (path, old, new, tests) in MUTATIONS.items()],
                  assertions_only=True))
