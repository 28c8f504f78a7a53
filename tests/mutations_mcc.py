"""Break MCC-KD and the scoring modes on purpose, one breakage at a time, and check that a test fails.

  .venv/bin/python tests/mutations_mcc.py [--only NAME,...] [--list] [--control]

The runner: tests/mutation_runner.py (a scratch copy of the tree; prints caught / SURVIVED)."""
from __future__ import annotations

import sys

from mutation_runner import main

MCC = "tests/test_mcc.py"
SCORING = "tests/test_scoring.py"
LOSS_TP1 = f"{MCC}::test_loss_settings_match_the_authors_tp1"

# (name, file, code, replacement, tests that must catch it)
MUTATIONS = [
    (
        "authors' span positions shifted back to ours (--span_logits ignored)",
        "engine/distill/mcc/losses.py",
        "return list(range(span_start, span_end))",
        "return list(range(span_start - 1, span_end - 1))",
        [LOSS_TP1],
    ),
    (
        "our span positions one token late",
        "engine/distill/mcc/losses.py",
        "return list(range(span_start - 1, span_end - 1))",
        "return list(range(span_start, span_end))",
        [LOSS_TP1, f"{MCC}::test_loss_matches_a_direct_reference"],
    ),
    (
        "temperature on one side only",
        "engine/distill/mcc/losses.py",
        "lb = torch.log_softmax(logits_b.float() / temperature, dim=-1)",
        "lb = torch.log_softmax(logits_b.float(), dim=-1)",
        [LOSS_TP1],
    ),
    (
        "temperature dropped",
        "engine/distill/mcc/losses.py",
        "la = torch.log_softmax(logits_a.float() / temperature, dim=-1)\n"
        "    lb = torch.log_softmax(logits_b.float() / temperature, dim=-1)",
        "la = torch.log_softmax(logits_a.float(), dim=-1)\n    lb = torch.log_softmax(logits_b.float(), dim=-1)",
        [LOSS_TP1],
    ),
    (
        "KL: every pair divided by the longest span (not its own length)",
        "engine/distill/mcc/losses.py",
        "return per_pos.sum(-1) / mask.sum(-1).clamp(min=1)",
        "return per_pos.sum(-1) / mask.shape[-1]",
        [LOSS_TP1],
    ),
    (
        "KL: a token mean over the step instead of the mean over pairs",
        "engine/distill/mcc/task.py",
        '{"ce": ce_count, "kl": len(pairs)}',
        '{"ce": ce_count, "kl": sum(len(p[1]) for p in pairs)}',
        [LOSS_TP1],
    ),
    (
        "CE sequence reduction normalised by tokens",
        "engine/distill/mcc/task.py",
        "ce_count = len(seqs)",
        "ce_count = int((labels != IGNORE).sum())",
        [LOSS_TP1],
    ),
    (
        "CE sequence reduction without the per-rationale mean",
        "engine/distill/mcc/losses.py",
        "labels[b : b + 1], rows) / rows.numel()",
        "labels[b : b + 1], rows)",
        [LOSS_TP1],
    ),
    (
        "train_mcc.py drops --span_logits / --ce_reduction on the way to the task",
        "engine/distill/mcc/args.py",
        "self.alpha, self.temperature, self.span_logits, self.ce_reduction)",
        "self.alpha, self.temperature)",
        [f"{MCC}::test_train_mcc_flags_reach_the_loss"],
    ),
    (
        "authors' accuracy over every item (the denominator)",
        "engine/infer/metrics.py",
        "return self.correct / self.answered if self.answered else 0.0",
        "return self.correct / self.total if self.total else 0.0",
        [f"{SCORING}::test_authors_accuracy_drops_the_unanswered_from_the_denominator"],
    ),
    (
        "answered counts the unanswered",
        "engine/infer/metrics.py",
        "return self.total - self.unparsable",
        "return self.total",
        [f"{SCORING}::test_authors_accuracy_drops_the_unanswered_from_the_denominator"],
    ),
    (
        "--scoring exact ignored when reading an output",
        "engine/text/answers.py",
        'if check_scoring(scoring) == "exact":\n        return _exact_answer(text or "", task)',
        "check_scoring(scoring)",
        [SCORING],
    ),
    (
        "exact scoring compares SVAMP / ASDiv as strings (no eval)",
        "engine/text/answers.py",
        'EXACT_EQUATION_TASKS = ("SVAMP", "ASDIV")',
        "EXACT_EQUATION_TASKS = ()",
        [SCORING],
    ),
    (
        "exact scoring evaluates ASDiv as text",
        "engine/text/answers.py",
        'EXACT_EQUATION_TASKS = ("SVAMP", "ASDIV")',
        'EXACT_EQUATION_TASKS = ("SVAMP",)',
        [SCORING],
    ),
    (
        "exact scoring's arithmetic in exact rationals (not Python's floats)",
        "engine/text/answers.py",
        "if isinstance(node, ast.Constant) and type(node.value) in (int, float):\n            return node.value",
        "if isinstance(node, ast.Constant) and type(node.value) in (int, float):\n"
        "            return _to_number(ast.get_source_segment(body, node))",
        [SCORING],
    ),
    (
        "mcc scoring reads the whole output, not its last line",
        "engine/text/answers.py",
        'endline = str(text).strip().split("\\n")[-1]',
        "endline = str(text).strip()",
        [SCORING],
    ),
    (
        "mcc scoring takes the first match of the line",
        "engine/text/answers.py",
        "return matches[-1] if matches else None",
        "return matches[0] if matches else None",
        [SCORING],
    ),
    (
        "infer.py evaluate ignores --scoring",
        "engine/infer/metrics.py",
        'acc.add(extract_answer(text, args.task, args.scoring), label["label"], args.task, args.scoring)',
        'acc.add(extract_answer(text, args.task), label["label"], args.task)',
        [f"{SCORING}::test_infer_evaluate_scoring_and_report"],
    ),
    (
        "infer.py evaluate ignores --report",
        "engine/infer/metrics.py",
        "return acc.as_dict(args.report)",
        "return acc.as_dict()",
        [f"{SCORING}::test_infer_evaluate_scoring_and_report"],
    ),
    (
        "generation with --task ignores --scoring",
        "engine/infer/jobs.py",
        "preds = [extract_answer(t, f.task, f.scoring) for t in texts]",
        "preds = [extract_answer(t, f.task) for t in texts]",
        [f"{SCORING}::test_generation_with_task_scores_as_asked"],
    ),
    (
        "generation summary ignores --report",
        "engine/infer/jobs.py",
        "summary.update(_accuracy(finished, job).as_dict(f.report))",
        "summary.update(_accuracy(finished, job).as_dict())",
        [f"{SCORING}::test_generation_with_task_scores_as_asked"],
    ),
    (
        "a resumed output file may change --scoring",
        "engine/infer/jobs.py",
        '    "task",\n    "scoring",\n',
        '    "task",\n',
        [f"{SCORING}::test_generation_with_task_scores_as_asked"],
    ),
    (
        "training evaluation ignores --scoring",
        "engine/train/evaluator.py",
        "accuracy_of(self.texts(model), self.labels, self.task, self.scoring)",
        "accuracy_of(self.texts(model), self.labels, self.task)",
        [f"{SCORING}::test_training_evaluation_scores_as_asked"],
    ),
    (
        "training evaluation ignores --report",
        "engine/train/evaluator.py",
        ".as_dict(self.report)",
        ".as_dict()",
        [f"{SCORING}::test_training_evaluation_scores_as_asked"],
    ),
    (
        "step-by-step's label task ignores --scoring",
        "engine/distill/step_by_step/args.py",
        "            self.eval_rationale_task,\n            self.scoring,\n",
        "            self.eval_rationale_task,\n",
        [f"{SCORING}::test_step_by_step_label_task_scores_as_asked"],
    ),
]


if __name__ == "__main__":
    sys.exit(main(MUTATIONS))
