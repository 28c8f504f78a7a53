"""Break on-policy distillation and the --divergence losses on purpose, one point at a time, and check
that a test fails (tests must be able to fail).

  .venv/bin/python tests/mutations_on_policy.py [--only NAME,...] [--list] [--control]

The runner: tests/mutation_runner.py (a scratch copy of the tree; prints caught / SURVIVED)."""
from __future__ import annotations

import sys

from mutation_runner import main

T = "tests/test_on_policy.py"
VP, TASK, SAMPLING = "models/vocab_parallel.py", "engine/distill/on_policy/task.py", "engine/distill/on_policy/sampling.py"
DIV = f"{T}::test_divergences_against_trl_in_float64_at_tp1_and_tp2"
SAMPLES = f"{T}::test_samples_equal_infer_py_and_follow_the_weights"
KD = f"{T}::test_lmbda_0_equals_teacher_kl_with_kl_weight_1"
FLAG = f"{T}::test_teacher_kl_divergence_flag_reaches_its_loss"

# (name, file, code, replacement, tests)
MUTATIONS = [
    ("JSD gradient without its (1 - beta)", VP, "return loss, temperature * (1 - beta) * q * (h - mean_h[:, None])",
     "return loss, temperature * q * (h - mean_h[:, None])", [DIV]),
    ("JSD mixture weights swapped", VP, "log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))",
     "log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))", [DIV]),
    ("JSD without T^2", VP, "per_row = all_reduce_tp_((beta * to_p + (1 - beta) * q * h).sum(dim=-1))\n"
     "    loss = temperature ** 2 * per_row.sum()",
     "per_row = all_reduce_tp_((beta * to_p + (1 - beta) * q * h).sum(dim=-1))\n    loss = per_row.sum()", [DIV]),
    ("JSD gradient's mean not summed over the vocabulary shards", VP,
     "mean_h = all_reduce_tp_((q * h).sum(dim=-1))", "mean_h = (q * h).sum(dim=-1)", [DIV]),
    ("reverse KL gradient without its KL term", VP, "return loss, temperature * q * (log_q - log_p - per_row[:, None])",
     "return loss, temperature * q * (log_q - log_p)", [DIV]),
    ("jsd_beta 1 is not reverse KL", VP, 'reverse = divergence == "reverse_kl" or beta == 1',
     'reverse = divergence == "reverse_kl"', [DIV]),
    ("--lmbda ignored (the student always samples)", SAMPLING, "if u < lmbda:", "if True:", [KD]),
    ("samples seeded without the step", TASK, "seed = step_seed(self.s.seed, writer, self.step)",
     "seed = step_seed(self.s.seed, writer, 1)", [SAMPLES]),
    ("the student samples from a copy of itself made at the first step", SAMPLING,
     "            self.runner = make_runner(self.model, self.compiled)",
     "            self.runner = make_runner(self.model, self.compiled)\n"
     "            self.copy = __import__('copy').deepcopy(self.model)\n"
     "        self.model = self.copy", [SAMPLES]),
    ("start_step called at the first step only", "engine/train/trainer.py",
     "        self.task.start_step(self.model, self.step + 1)",
     "        self.step == 0 and self.task.start_step(self.model, self.step + 1)", [SAMPLES]),
    ("a sampled response's first token gets no loss", TASK,
     "    labels = [IGNORE] * (len(prompt) - 1) + seq[len(prompt):]",
     "    labels = [IGNORE] * len(prompt) + seq[len(prompt) + 1:]", [SAMPLES]),
    ("--gen_top_p ignored", "engine/distill/on_policy/args.py", "top_p=self.gen_top_p)", "top_p=1.0)", [SAMPLES]),
    ("--num_samples ignored", TASK, "asks = [(i, k) for i in records for k in range(self.s.num_samples)]",
     "asks = [(i, k) for i in records for k in range(1)]", [SAMPLES]),
    ("on_policy ignores --kl_temperature", TASK, "how = (self.s.kl_temperature, self.s.divergence, self.s.jsd_beta)",
     "how = (1.0, self.s.divergence, self.s.jsd_beta)", [KD]),
    ("on_policy ignores --divergence", TASK, "how = (self.s.kl_temperature, self.s.divergence, self.s.jsd_beta)",
     'how = (self.s.kl_temperature, "forward_kl", self.s.jsd_beta)', [FLAG]),
    ("teacher_kl ignores --divergence", "engine/distill/teacher_kl/task.py",
     "how = (self.temperature, self.divergence, self.jsd_beta)", 'how = (self.temperature, "forward_kl", self.jsd_beta)',
     [FLAG]),
    ("samples of the resumed steps kept twice", TASK, 'if json.loads(line)["step"] < step:', "if True:",
     [f"{T}::test_resume_gives_the_same_losses_and_samples"]),
    ("a teacher of another vocabulary accepted", "engine/distill/on_policy/args.py",
     "        teacher.require_same_vocabulary(", "        (lambda *a: None)(", [f"{T}::test_refused_input"]),
    ("the on-policy decision drawn from Python's random state (as TRL's)", SAMPLING,
     'u = request_seed(seed, "lmbda", step, micro) / float(1 << 31)', 'u = __import__("random").random()',
     [f"{T}::test_resume_gives_the_same_losses_and_samples"]),
]


if __name__ == "__main__":
    sys.exit(main(MUTATIONS))
