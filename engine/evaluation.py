"""Accuracy of a model's answers: counts (unparsable outputs are wrong, never dropped), and greedy
generation on labelled records during training."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

from engine import distributed
from engine.answers import check_task, extract_answer, is_correct, parse_label
from engine.generation import SamplingParams, complete_prompts, fit_prompt
from engine.prompts import format_prompt


@dataclass
class Accuracy:
    correct: int = 0
    total: int = 0
    unparsable: int = 0  # outputs with no readable answer
    unparsable_labels: int = 0  # gold labels that cannot be read for the task (scored wrong)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def add(self, prediction: Optional[str], label, task: str) -> bool:
        ok = is_correct(prediction, label, task)
        self.count(prediction, ok, parse_label(label, task) is not None)
        return ok

    def count(self, prediction: Optional[str], ok: bool, label_readable: bool = True) -> None:
        self.total += 1
        self.correct += bool(ok)
        self.unparsable += prediction is None
        self.unparsable_labels += not label_readable

    def as_dict(self) -> dict:
        out = {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "unparsable": self.unparsable}
        if self.unparsable_labels:  # only where there are some: clean data reads as before
            out["unparsable_labels"] = self.unparsable_labels
        return out


def accuracy_of(texts: Iterable[str], labels: Iterable, task: str) -> Accuracy:
    acc = Accuracy()
    for text, label in zip(texts, labels):
        acc.add(extract_answer(text, task), label, task)
    return acc


class GenerationEvaluator:
    """Greedy generation on labelled records and task accuracy. Data-parallel replicas take
    interleaved slices; counts are summed over them."""

    def __init__(self, records, tokenizer, task: str, info, batch_size: int = 64, max_new_tokens: int = 256,
                 template: str = "default"):
        self.task, self.tok, self.info = check_task(task), tokenizer, info
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        mine = records[info.dp_rank::info.dp_size]
        self.labels = [r.get("label") for r in mine]
        self.prompts = [tokenizer.encode(format_prompt(r["instruction"], template)) for r in mine]

    def texts(self, model) -> List[str]:
        params = SamplingParams(max_new_tokens=self.max_new_tokens)
        stop = [self.tok.eos_id] if self.tok.eos_id is not None else []
        limit = max(1, model.args.max_seq_len - self.max_new_tokens)  # long prompts lose their beginning
        prompts = [fit_prompt(p, limit, self.tok.bos_id) for p in self.prompts]
        new = complete_prompts(model, prompts, params, stop, batch_size=self.batch_size)
        return [self.tok.decode([t for t in ids if t not in stop]) for ids in new]

    def __call__(self, model) -> dict:
        acc = accuracy_of(self.texts(model), self.labels, self.task)
        counts = torch.tensor([acc.correct, acc.total, acc.unparsable, acc.unparsable_labels], dtype=torch.float64,
                              device=model.head_weight.device)
        if dist.is_initialized() and self.info.dp_size > 1:
            dist.all_reduce(counts, group=distributed.dp_group())
        c, t, u, b = (int(x) for x in counts.tolist())
        return Accuracy(correct=c, total=t, unparsable=u, unparsable_labels=b).as_dict()
