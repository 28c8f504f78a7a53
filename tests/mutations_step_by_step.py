"""Break distilling step-by-step's data, labels, selection and evaluation on purpose, one breakage at a
time, and check that a test fails (issue 21).

  .venv/bin/python tests/mutations_step_by_step.py [--only NAME,NAME] [--list] [--control]

The runner: tests/mutation_runner.py (a scratch copy of the tree; prints caught / SURVIVED)."""
from __future__ import annotations

import sys

from mutation_runner import main

A = "tests/test_step_by_step_authors.py"
S = "tests/test_step_by_step.py"
CONVERTER = "data/prepare_step_by_step.py"
DATA = "engine/distill/step_by_step/data.py"
ARGS = "engine/distill/step_by_step/args.py"

# (name, file, old snippet, new snippet, tests: pytest node ids)
MUTATIONS = [
    ("--label_type llm ignores llm_label", DATA,
     '        label = rec["llm_label"]\n', '        label = rec["label"]\n',
     [f"{A}::test_label_type_llm_trains_on_the_teachers_label",
      f"{A}::test_the_label_task_trains_and_scores_text_labels"]),
    ("the training evaluator drops the predict: prefix", "engine/distill/step_by_step/evaluator.py",
     '"instruction": task_instruction(r["instruction"], name, prefixes)}', '"instruction": r["instruction"]}',
     [f"{A}::test_the_evaluator_decodes_the_label_task_with_its_prefix"]),
    ("CQA split keeps the answer sentence", CONVERTER,
     "    rationale, label = rationale_label.split('So the answer is')\n    rationale = rationale.rstrip()",
     "    rationale, label = rationale_label.split('So the answer is')\n"
     "    rationale = (rationale + 'So the answer is' + label).rstrip()",
     [f"{A}::test_the_authors_split_on_their_own_cqa_data",
      f"{S}::test_our_parse_keeps_the_answer_sentence_and_letters"]),
    ("CQA split at the last 'Q:' instead of the first", CONVERTER,
     "    rationale_label = output.split('Q:')[0]\n    rationale_label = rationale_label.rstrip()\n"
     "    rationale, label = rationale_label.split('So the answer is')",
     "    rationale_label = output.rsplit('Q:', 1)[0] if output.count('Q:') > 1 else output.split('Q:')[0]\n"
     "    rationale_label = rationale_label.rstrip()\n"
     "    rationale, label = rationale_label.split('So the answer is')",
     [f"{A}::test_the_authors_split_on_their_own_cqa_data"]),
    ("SVAMP split at 'the answer is' whatever its case", CONVERTER,
     "        rationale, label = rationale_label.split('The answer is')",
     "        rationale, label = re.split('[Tt]he answer is', rationale_label)",
     [f"{A}::test_the_authors_split_on_svamp_cases"]),
    ("converter writes CSQA letters by default", CONVERTER,
     'label_format = label_format or "text"', 'label_format = label_format or "letter"',
     [f"{A}::test_the_authors_split_on_their_own_cqa_data",
      f"{S}::test_our_parse_keeps_the_answer_sentence_and_letters"]),
    ("authors' text labels normalised to the choice's spelling", CONVERTER,
     'and (parse, label_format) != ("authors", "text"):', ":",
     [f"{A}::test_the_authors_split_on_their_own_cqa_data"]),
    ("a text answer is not read through the choices", "engine/text/answers.py",
     "    if task in CHOICE_TASKS and choices:", "    if task in CHOICE_TASKS and choices and False:",
     [f"{A}::test_a_text_answer_reads_as_its_choice", f"{A}::test_the_label_task_trains_and_scores_text_labels"]),
    ("the training evaluator scores without the choices", "engine/train/evaluator.py",
     "accuracy_of(self.texts(model), self.labels, self.task, self.scoring, self.choices)",
     "accuracy_of(self.texts(model), self.labels, self.task, self.scoring)",
     [f"{A}::test_the_label_task_trains_and_scores_text_labels"]),
    ("infer.py generation scores without the choices", "engine/infer/jobs.py",
     'oks = [is_correct(p, rec.get("label"), f.task, f.scoring, options) for p in preds]',
     'oks = [is_correct(p, rec.get("label"), f.task, f.scoring) for p in preds]',
     [f"{A}::test_infer_scores_text_labels_through_the_choices"]),
    ("calibration reads the answer without the choices", "engine/infer/calibration.py",
     "prediction = extract_answer(text, task, choices=options)", "prediction = extract_answer(text, task)",
     [f"{A}::test_infer_scores_text_labels_through_the_choices"]),
    ("held-out count rounded instead of ceil", DATA,
     "n_test = min(math.ceil(test_size * n), n)", "n_test = min(round(test_size * n), n)",
     [f"{A}::test_the_authors_selection_is_datasets_train_test_split"]),
    ("held-out part taken from the permutation's end", DATA,
     "return permutation[n_test:], permutation[:n_test]",
     "return permutation[:n - n_test], permutation[n - n_test:]",
     [f"{A}::test_the_authors_selection_is_datasets_train_test_split"]),
    ("--subsample drawn with seed 0 whatever --seed", ARGS,
     "authors_training_indices(len(records), self.subsample, self.seed, self.holdout_fraction,",
     "authors_training_indices(len(records), self.subsample, 0, self.holdout_fraction,",
     [f"{A}::test_held_out_and_subsampled_records_are_never_trained_on"]),
    ("held-out records trained on anyway", ARGS,
     "self.label_type, passes, self.task_prefixes(), selected)", "self.label_type, passes, self.task_prefixes())",
     [f"{A}::test_held_out_and_subsampled_records_are_never_trained_on"]),
    ("--standard keeps the task prefixes", ARGS,
     'return {name: "" for name in TASK_PREFIXES} if self.standard else None', "return None",
     [f"{A}::test_standard_is_plain_fine_tuning_without_prefixes"]),
]


if __name__ == "__main__":
    sys.exit(main(MUTATIONS))
