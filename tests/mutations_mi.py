"""Mutation check of the MI term, calibration and rationale BLEU (issue 21, items 5-7): each mutation
breaks the code on purpose in a scratch copy of the tree and runs the tests that must catch it; a
mutation whose tests still pass is reported as SURVIVED (and the script exits non-zero).

  .venv/bin/python tests/mutations_mi.py [NAME ...]      # the control run and all mutations by default

Not collected by pytest (no test_ prefix); the working tree is never modified.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def scratch_copy() -> str:
    """The tracked and untracked (not ignored) files of the tree in a temporary directory, .venv linked."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    dest = tempfile.mkdtemp(prefix="mutations-mi-")
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    os.symlink(os.path.realpath(os.path.join(ROOT, ".venv")), os.path.join(dest, ".venv"))
    return dest


def run_one(name: str) -> bool:
    """True when a test caught the mutation ("control": no mutation, every test run here must pass)."""
    if name == "control":
        tests = sorted({t for _, _, ts in MUTATIONS.values() for t in ts})
        what, edits = "the tree as it is (every test must pass)", []
    else:
        what, edits, tests = MUTATIONS[name]
    dest = scratch_copy()
    try:
        for path, old, new in edits:
            full = os.path.join(dest, path)
            text = open(full).read()
            if text.count(old) != 1:
                raise SystemExit(f"mutation {name}: the text to break is not once in {path}: {old!r}")
            open(full, "w").write(text.replace(old, new))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=dest,
            capture_output=True,
            text=True,
            env=env,
        )
        caught = proc.returncode != 0
        if name == "control":
            print(f"control: {'FAILED' if caught else 'passed'}; {proc.stdout.strip().splitlines()[-1]}")
            return not caught
        failed = [ln.split(" ")[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED ")]
        print(
            f"{'caught  ' if caught else 'SURVIVED'} {name}: {what}; {', '.join(failed) or proc.stdout.strip()[-200:]}"
        )
        return caught
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def main(names) -> int:
    names = names or ["control", *MUTATIONS]
    survived = [n for n in names if not run_one(n)]  # a failing control is listed here too
    broken = [n for n in names if n != "control"]
    caught = len(broken) - len([n for n in survived if n != "control"])
    print(
        f"{caught}/{len(broken)} mutations caught"
        + (f"; not caught (or control failed): {survived}" if survived else "")
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
