"""Distilling step-by-step data: the label task x -> y and the rationale task x -> r of each question."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from engine.distill.sft import SFTData
from engine.runtime.errors import DataError
from engine.text.answers import CHOICE_TASKS, choices_in, extract_answer, parse_label
from engine.text.records import validate_training_records

# ----------------------------------------------------------------------------------------------
# Distilling step-by-step: the label task x -> y and the rationale task x -> r of each question
# ----------------------------------------------------------------------------------------------
LABEL_TYPES = ("gt", "llm")


def step_by_step_label(rec: dict, index: int, path: str, task: str, label_type: str) -> Optional[str]:
    """The label-task target of a record: its gold 'label' (gt), or the label its teacher reached (llm:
    'llm_label', else the answer its rationale states); one sentence when it does not read as a `task`
    answer. A CSQA label may be a choice's text (the authors' labels are). With llm: None when
    'llm_label' is blank (the authors' parse found no label in the teacher's text: the record is left
    out of training), and a CSQA teacher label that names no choice ("aquarium or") is trained as
    written, as the authors do."""
    choices = choices_in(rec.get("instruction"))
    if label_type == "gt":
        if rec.get("label") is None:
            raise DataError(f"{path} record {index} lacks the key 'label' (the label task's target with "
                            f"--label_type gt)")
        label = rec["label"]
        where = f"'label' {label!r}"
    elif rec.get("llm_label") is not None:
        label = rec["llm_label"]
        where = f"'llm_label' {label!r}"
        if isinstance(label, str) and not label.strip():
            return None
    elif isinstance(rec.get("output"), str):
        label = extract_answer(rec["output"], task, choices=choices)
        where = f"the answer its rationale states ({label})"
    else:
        raise DataError(f"{path} record {index} has no 'llm_label' and no single rationale to read one from "
                        f"(--label_type llm)")
    text = "" if label is None or isinstance(label, bool) else str(label).strip()
    teacher_text = label_type == "llm" and task in CHOICE_TASKS and choices and text and "llm_label" in rec
    if parse_label(text, task, choices=choices) is None and not teacher_text:
        raise DataError(f"{path} record {index}: {where} is not an answer of --task {task} (--label_type {label_type})")
    return text


def train_test_split_indices(n: int, test_size: float, seed: int) -> Tuple[List[int], List[int]]:
    """(train, test) indices, in the order the splits hold them, as datasets.Dataset.train_test_split(
    test_size=<float>, seed=seed) draws them (huggingface/datasets src/datasets/arrow_dataset.py @ b7cb10b0:
    n_test = ceil(test_size * n) :5126, n_train = n - n_test :5136, np.random.default_rng(seed) :5164,
    permutation = generator.permutation(n); test = permutation[:n_test], train = the rest :5226-5228)."""
    n_test = min(math.ceil(test_size * n), n)  # datasets refuses an empty train part; the caller says so
    permutation = np.random.default_rng(seed).permutation(n).tolist()
    return permutation[n_test:], permutation[:n_test]


def authors_training_indices(n: int, subsample: float = 1.0, subsample_seed: int = 0,
                             holdout_fraction: float = 0.0, holdout_seed: int = 0) -> List[int]:
    """The indices of the n records the distilling step-by-step authors train on (run.py:79-80, 95-101):
    --subsample < 1 keeps train_test_split(test_size=1.0 - subsample, seed=run)['train'] first; then
    a held-out part, train_test_split(test_size=holdout_fraction, seed=holdout_seed)['test'] of what is
    left (their 'valid' split, 0.1 and seed 0, which nothing ever reads), is not trained on."""
    indices = list(range(n))
    if subsample < 1.0:
        keep, _ = train_test_split_indices(n, 1.0 - subsample, subsample_seed)
        indices = [indices[i] for i in keep]
    if holdout_fraction > 0:
        keep, _ = train_test_split_indices(len(indices), holdout_fraction, holdout_seed)
        indices = [indices[i] for i in keep]
    return indices


@dataclass(frozen=True)
class LabelSource:
    """What the label task learns: the records' gold label (label_type gt) or the teacher's (llm), read
    as answers of `task`."""

    task: str = "GSM8K"
    label_type: str = "gt"


class StepByStepData:
    """Records -> the two tasks of distilling step-by-step over one model, told apart by a task prefix
    of the instruction (engine.prompts.TASK_PREFIXES, or `prefixes`; empty ones for the authors'
    standard model): `label` (instruction -> label, the gold one or the teacher's by `label_type`) and
    `rationale` (instruction -> the teacher's rationale; a list gives one per epoch, as SFTData). Only
    the `passes` asked for are built (and required of the records). Each pass is an SFTData over the
    records trained on: `selected` (record indices, e.g. authors_training_indices; default all) less
    those whose teacher label is blank (--label_type llm). An example is a question kept by every pass;
    examples are named by their index in `records`."""

    def __init__(self, records: List[dict], tokenizer, max_seq_len: int, template: str = "default",
                 seed: int = 0, path: str = "train_file", labels: LabelSource = LabelSource(),
                 passes=("label", "rationale"), prefixes: dict = None, selected: Optional[List[int]] = None):
        from engine.text.prompts import TASK_PREFIXES, task_instruction

        task, label_type = labels.task, labels.label_type

        if label_type not in LABEL_TYPES:
            raise DataError(f"--label_type {label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        self.prefixes, self.passes, self.tok = prefixes or TASK_PREFIXES, tuple(passes), tokenizer
        self.sets, self.n_records = {}, len(records)
        self.blank_labels = self.unnamed_labels = 0
        if "rationale" in self.passes:
            for i, rec in enumerate(records):
                out = rec.get("output")
                if out is None or (isinstance(out, (str, list)) and not out):
                    raise DataError(f"{path} record {i} has no rationale ('output') for the rationale task")
            validate_training_records(records, path)
        rows = sorted(set(range(len(records)) if selected is None else selected))
        self.held_out = len(records) - len(rows)
        labels = {}
        if "label" in self.passes:
            labels = {i: step_by_step_label(records[i], i, path, task, label_type) for i in rows}
            self.blank_labels = sum(y is None for y in labels.values())
            rows = [i for i in rows if labels[i] is not None]
            self.unnamed_labels = sum(parse_label(labels[i], task, choices=choices_in(records[i].get("instruction"))) is None
                                      for i in rows)
        if not rows:
            raise DataError(f"{path}: no record is left to train on ({self.held_out} held out or subsampled away, "
                            f"{self.blank_labels} with a blank teacher label)")
        self.rows, self._position = rows, {r: p for p, r in enumerate(rows)}
        targets = {"rationale": lambda i: records[i]["output"], "label": lambda i: labels[i]}
        for name in ("rationale", "label"):
            if name in self.passes:
                self.sets[name] = SFTData(
                    [{"instruction": task_instruction(records[i]["instruction"], name, self.prefixes),
                      "output": targets[name](i)} for i in rows], tokenizer, max_seq_len, template, seed, path)
        kept = [{rows[p] for p in s.keep} for s in self.sets.values()]
        self.keep = sorted(set.intersection(*kept))
        if not self.keep:
            raise DataError(f"{path}: no record fits --max_seq_len={max_seq_len} in every task")

    def __len__(self) -> int:
        return len(self.keep)

    def example(self, task: str, index: int, epoch: int):
        """(input_ids, labels) of record `index` in one task (see SFTData.example)."""
        return self.sets[task].example(self._position[index], epoch)

    def length(self, index: int, epoch: int) -> int:
        """Tokens of the question over its passes (for length bucketing)."""
        p = self._position[index]
        return sum(min(s.full_length(p, epoch), s.max_seq_len) for s in self.sets.values())

    def describe(self) -> str:
        parts = []
        for name, s in self.sets.items():
            part = f"{name} task"
            if s.truncated:
                part += f" ({s.truncated} truncated to --max_seq_len={s.max_seq_len})"
            parts.append(part)
        dropped = len(self.rows) - len(self.keep)
        notes = [f"{dropped} dropped (a prompt alone reaches --max_seq_len)" if dropped else "",
                 f"{self.held_out} of {self.n_records} held out (--holdout_fraction / --subsample)"
                 if self.held_out else "",
                 f"{self.blank_labels} left out (a blank teacher label)" if self.blank_labels else "",
                 f"{self.unnamed_labels} teacher labels name no choice (trained as written)"
                 if self.unnamed_labels else ""]
        return f"{len(self)} training questions, each in the {' and the '.join(parts)}" + "".join(
            f"; {n}" for n in notes if n)
