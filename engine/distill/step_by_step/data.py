"""Distilling step-by-step data: the label task x -> y and the rationale task x -> r of each question."""
from __future__ import annotations

from typing import List

from engine.distill.sft import SFTData
from engine.runtime.errors import DataError
from engine.text.answers import extract_answer, parse_label
from engine.text.records import validate_training_records

# ----------------------------------------------------------------------------------------------
# Distilling step-by-step: the label task x -> y and the rationale task x -> r of each question
# ----------------------------------------------------------------------------------------------
LABEL_TYPES = ("gt", "llm")


def step_by_step_label(rec: dict, index: int, path: str, task: str, label_type: str) -> str:
    """The label-task target of a record: its gold 'label' (gt), or the label its teacher reached (llm:
    'llm_label', else the answer its rationale states); one sentence when it does not read as a `task`
    answer."""
    if label_type == "gt":
        if rec.get("label") is None:
            raise DataError(f"{path} record {index} lacks the key 'label' (the label task's target with "
                            f"--label_type gt)")
        label = rec["label"]
        where = f"'label' {label!r}"
    elif rec.get("llm_label") is not None:
        label = rec["llm_label"]
        where = f"'llm_label' {label!r}"
    elif isinstance(rec.get("output"), str):
        label = extract_answer(rec["output"], task)
        where = f"the answer its rationale states ({label})"
    else:
        raise DataError(f"{path} record {index} has no 'llm_label' and no single rationale to read one from "
                        f"(--label_type llm)")
    text = "" if label is None or isinstance(label, bool) else str(label).strip()
    if parse_label(text, task) is None:
        raise DataError(f"{path} record {index}: {where} is not an answer of --task {task} (--label_type {label_type})")
    return text


class StepByStepData:
    """Records -> the two tasks of distilling step-by-step over one model, told apart by a task prefix
    of the instruction (engine.prompts.TASK_PREFIXES): `label` (instruction -> label, the gold one or
    the teacher's by `label_type`) and `rationale` (instruction -> the teacher's rationale; a list
    gives one per epoch, as SFTData). Only the `passes` asked for are built (and required of the
    records). Each pass is an SFTData; an example is a question kept by every pass."""

    def __init__(self, records: List[dict], tokenizer, max_seq_len: int, template: str = "default",
                 seed: int = 0, path: str = "train_file", task: str = "GSM8K", label_type: str = "gt",
                 passes=("label", "rationale"), prefixes: dict = None):
        from engine.text.prompts import TASK_PREFIXES, task_instruction

        if label_type not in LABEL_TYPES:
            raise DataError(f"--label_type {label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        self.prefixes, self.passes, self.tok = prefixes or TASK_PREFIXES, tuple(passes), tokenizer
        self.sets = {}
        if "rationale" in self.passes:
            for i, rec in enumerate(records):
                out = rec.get("output")
                if out is None or (isinstance(out, (str, list)) and not out):
                    raise DataError(f"{path} record {i} has no rationale ('output') for the rationale task")
            validate_training_records(records, path)
            self.sets["rationale"] = SFTData(
                [{"instruction": task_instruction(r["instruction"], "rationale", self.prefixes), "output": r["output"]}
                 for r in records], tokenizer, max_seq_len, template, seed, path)
        if "label" in self.passes:
            labels = [step_by_step_label(r, i, path, task, label_type) for i, r in enumerate(records)]
            self.sets["label"] = SFTData(
                [{"instruction": task_instruction(r["instruction"], "label", self.prefixes), "output": y}
                 for r, y in zip(records, labels)], tokenizer, max_seq_len, template, seed, path)
        kept = [set(s.keep) for s in self.sets.values()]
        self.keep = sorted(set.intersection(*kept))
        if not self.keep:
            raise DataError(f"{path}: no record fits --max_seq_len={max_seq_len} in every task")
        self.n_records = len(records)

    def __len__(self) -> int:
        return len(self.keep)

    def example(self, task: str, index: int, epoch: int):
        """(input_ids, labels) of record `index` in one task (see SFTData.example)."""
        return self.sets[task].example(index, epoch)

    def length(self, index: int, epoch: int) -> int:
        """Tokens of the question over its passes (for length bucketing)."""
        return sum(min(s.full_length(index, epoch), s.max_seq_len) for s in self.sets.values())

    def describe(self) -> str:
        parts = []
        for name, s in self.sets.items():
            part = f"{name} task"
            if s.truncated:
                part += f" ({s.truncated} truncated to --max_seq_len={s.max_seq_len})"
            parts.append(part)
        dropped = self.n_records - len(self.keep)
        return (f"{len(self)} training questions, each in the {' and the '.join(parts)}"
                + (f"; {dropped} dropped (a prompt alone reaches --max_seq_len)" if dropped else ""))
