"""Mutation check of the MI term, calibration and rationale BLEU (issue 21, items 5-7): each breakage
is applied in a scratch copy of the tree and the tests that must catch it run.

  .venv/bin/python tests/mutations_mi.py [--only NAME,...] [--list] [--control]

The runner: tests/mutation_runner.py (prints caught / SURVIVED)."""
from __future__ import annotations

import sys

from mutation_runner import main

MI = "engine/distill/step_by_step/mi.py"
TASK = "engine/distill/step_by_step/task.py"
ARGS = "engine/distill/step_by_step/args.py"
EVAL = "engine/distill/step_by_step/evaluator.py"
CAL = "engine/infer/calibration.py"
METRICS = "engine/infer/metrics.py"
T = "tests/test_mi_calibration_bleu.py::"
MODEL_TEST = T + "test_first_step_authors_mi_is_their_code_on_the_model"
UNIT_TEST = T + "test_authors_mi_is_their_code_padding_included_or_masked"
CAL_TEST = T + "test_calibration_confidence_and_token_correctness_by_hand"
BINS_TEST = T + "test_equal_mass_bins_are_their_ece_equal_mass"
BLEU_TEST = T + "test_sentence_mean_bleu_is_their_evaluate_bleu"
EVAL_TEST = T + "test_training_evaluator_reports_the_authors_bleu"

# name: (what it breaks, [(file, old, new)], tests that must fail)
MUTATIONS = {
    "padding_masked_by_default": (
        "the authors' max-pool skips the padding unless asked (their code pools over it)",
        [(TASK, "        if self.mask_padding:\n", "        if True:\n")],
        [MODEL_TEST + "[False]"],
    ),
    "mask_ignored": (
        "--mi_mask_padding True still pools over the padding",
        [
            (
                MI,
                "    if mask is not None:\n        probs = probs.masked_fill",
                "    if False:\n        probs = probs.masked_fill",
            )
        ],
        [UNIT_TEST, MODEL_TEST + "[True]"],
    ),
    "window_one_late": (
        "the window starts one position after the one predicting the first response token",
        [
            (
                MI,
                "    cols = first[:, None] + torch.arange(width)[None, :]",
                "    cols = first[:, None] + 1 + torch.arange(width)[None, :]",
            )
        ],
        [MODEL_TEST + "[False]"],
    ),
    "window_without_padding": (
        "each row's window is its own labels only (padded with its last position), not the batch's width",
        [
            (
                TASK,
                '                extra = {"positions": response_window(labels, self.device)}',
                '                extra = {"positions": response_positions(labels, self.device)}',
            )
        ],
        [MODEL_TEST + "[False]"],
    ),
    "label_not_detached": (
        "the label pass's pooled probabilities keep their graph (theirs: .detach(), model_utils.py:62)",
        [
            (
                MI,
                "    with torch.no_grad():\n        target = authors_pooled_probabilities(label_logits.detach(), label_mask)",
                "    if True:\n        target = authors_pooled_probabilities(label_logits, label_mask)",
            )
        ],
        [UNIT_TEST],
    ),
    "pooled_not_logits": (
        "the pooled probabilities enter as log-probabilities, not as logits of a log-softmax",
        [
            (
                MI,
                "    per_example = reduce_from_tp(-(target * sharded_log_softmax(pooled)).sum(dim=-1))",
                "    per_example = reduce_from_tp(-(target * pooled.clamp(min=1e-30).log()).sum(dim=-1))",
            )
        ],
        [UNIT_TEST, MODEL_TEST + "[False]"],
    ),
    "softmax_not_max_pooled": (
        "mean-pool instead of max-pool over positions",
        [(MI, "    return probs.max(dim=1).values\n", "    return probs.mean(dim=1)\n")],
        [UNIT_TEST],
    ),
    "authors_flag_ignored": (
        "--mi_estimator authors runs our pooled_distribution_ce",
        [
            (
                TASK,
                '        if self.estimator == "pooled_distribution_ce":\n            return pooled',
                "        if True:\n            return pooled",
            )
        ],
        [MODEL_TEST + "[False]"],
    ),
    "beta_default_not_authors": (
        "--mi_estimator authors without --beta gets 0.5 instead of their 0.1",
        [
            (
                ARGS,
                'self.beta = 0.1 if self.mi_estimator == "authors" else 0.0',
                'self.beta = 0.5 if self.mi_estimator == "authors" else 0.0',
            )
        ],
        [MODEL_TEST + "[False]"],
    ),
    "bin_edges_equal_split": (
        "equal-mass bins as an even split (i * n_bins // N) instead of ceil(N / n_bins) per bin",
        [
            (
                METRICS,
                "        bins[i] = rank // per_bin\n",
                "        bins[i] = min(rank * num_bins // len(confidences), num_bins - 1)\n",
            )
        ],
        [BINS_TEST],
    ),
    "bin_ties_by_input_order": (
        "ties in confidence ignore their (pred, label) sort",
        [
            (
                METRICS,
                "    order = sorted(range(len(confidences)), key=lambda i: (confidences[i], *keys[i]))",
                "    order = sorted(range(len(confidences)), key=lambda i: confidences[i])",
            )
        ],
        [BINS_TEST],
    ),
    "binning_flag_ignored": (
        "--binning equal_mass runs equal-width bins",
        [
            (
                METRICS,
                '    if binning == "equal_mass":\n        where = equal_mass_bins',
                "    if False:\n        where = equal_mass_bins",
            )
        ],
        [BINS_TEST, CAL_TEST],
    ),
    "confidence_one_token_late": (
        "the confidence is read at the answer token's own position, one token late (the issue's breakage)",
        [
            (
                CAL,
                "        at = torch.tensor([positions[i] - 1 for i in chunk], device=device)",
                "        at = torch.tensor([positions[i] for i in chunk], device=device)",
            )
        ],
        [CAL_TEST],
    ),
    "confidence_of_the_next_token": (
        "the confidence is the probability of the token after the answer's first",
        [
            (
                CAL,
                "            positions.append(len(prompts[i]) + index)",
                "            positions.append(len(prompts[i]) + index + 1)",
            )
        ],
        [CAL_TEST],
    ),
    "token_correctness_is_answer": (
        "--correctness token scores the whole answer",
        [
            (
                CAL,
                '        "correct": token_right if correctness == "token" else answer_right,',
                '        "correct": answer_right,',
            )
        ],
        [CAL_TEST],
    ),
    "gold_token_not_first_spelling": (
        "the gold label's first token is its lone space piece, not its first digit",
        [
            (
                CAL,
                "    return ids[first_spelling_token(tokenizer, ids)] if ids else None",
                "    return ids[0] if ids else None",
            )
        ],
        [CAL_TEST],
    ),
    "token_correct_against_the_first_generated": (
        "token correctness compares the first generated token, not the answer's",
        [(CAL, "    token_right = tokens[index] == gold\n", "    token_right = tokens[0] == gold\n")],
        [CAL_TEST],
    ),
    "bleu_smoothed": (
        "the per-record BLEU smooths every order (+1), as tensorflow/nmt's smooth=True",
        [
            (
                METRICS,
                "    if hyp_len == 0 or ref_len == 0 or min(matches) == 0:",
                "    if hyp_len == 0 or ref_len == 0:",
            ),
            (
                METRICS,
                "math.log(m / p) for m, p in zip(matches, possible)",
                "math.log((m + 1) / (p + 1)) for m, p in zip(matches, possible)",
            ),
        ],
        [BLEU_TEST],
    ),
    "bleu_closest_reference": (
        "the per-record BLEU's brevity penalty uses the closest reference (theirs: the shortest)",
        [
            (
                METRICS,
                '    stats = bleu_statistics([hypothesis], [references], reference_length="shortest")',
                "    stats = bleu_statistics([hypothesis], [references])",
            )
        ],
        [BLEU_TEST],
    ),
    "bleu_flag_ignored": (
        "infer.py bleu --bleu sentence_mean prints corpus BLEU",
        [(METRICS, '    if args.bleu == "sentence_mean":', "    if False:")],
        [BLEU_TEST],
    ),
    "evaluator_bleu_kind_ignored": (
        "--rationale_bleu sentence_mean logs corpus BLEU",
        [(EVAL, '            if self.bleu == "sentence_mean":', "            if False:")],
        [EVAL_TEST],
    ),
}


if __name__ == "__main__":
    sys.exit(main([(f"{name}: {what}", edits, tests) for name, (what, edits, tests) in MUTATIONS.items()]))
