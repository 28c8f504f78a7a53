"""Answer extraction and accuracy per task. Unparsable outputs are wrong, never dropped.

GSM8K / SVAMP / ASDiv: the last number of the sentence that states the answer ("... the answer is
18 ."), commas removed, compared numerically; without such a sentence, the last number of the text.
CSQA: the choice letter A-E of the answer sentence, else the last standalone letter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

from engine.errors import UserError

NUMERIC_TASKS = ("GSM8K", "SVAMP", "ASDIV", "ARITH", "MULT")
CHOICE_TASKS = ("CSQA",)
TASKS = NUMERIC_TASKS + CHOICE_TASKS

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_CHOICE = re.compile(r"\(([A-Ea-e])\)|(?<![A-Za-z'])([A-E])(?![A-Za-z'])")


def check_task(task: str) -> str:
    t = str(task).upper()
    if t not in TASKS:
        raise UserError(f"--task {task!r} is unknown; known tasks: GSM8K, SVAMP, ASDiv, CSQA, ARITH, MULT")
    return t


def _answer_sentence(text: str) -> Optional[str]:
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    end = _SENTENCE_END.search(rest)
    return rest[: end.start()] if end else rest


def _to_number(s: str) -> Optional[float]:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str, task: str) -> Optional[str]:
    """The answer a model's output states, normalised; None when nothing can be read."""
    task = check_task(task)
    text = text or ""
    sentence = _answer_sentence(text)
    if task in CHOICE_TASKS:
        for segment in (sentence, text):
            if segment:
                letters = [(a or b).upper() for a, b in _CHOICE.findall(segment)]
                if letters:
                    return letters[0] if segment is sentence else letters[-1]
        return None
    for segment in (sentence, text):
        if segment:
            numbers = [n for n in _NUMBER.findall(segment) if _to_number(n) is not None]
            if numbers:
                value = _to_number(numbers[-1])
                return str(int(value)) if value == int(value) else str(value)
    return None


def is_correct(prediction: Optional[str], label, task: str) -> bool:
    if prediction is None or label is None:
        return False
    task = check_task(task)
    if task in CHOICE_TASKS:
        m = _CHOICE.search(str(label).strip())
        return bool(m) and (m.group(1) or m.group(2)).upper() == prediction
    gold = _to_number(str(label).strip())
    pred = _to_number(prediction)
    return gold is not None and pred is not None and abs(gold - pred) <= 1e-4 * max(1.0, abs(gold))


@dataclass
class Accuracy:
    correct: int = 0
    total: int = 0
    unparsable: int = 0
    wrong_examples: List[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def add(self, prediction: Optional[str], label, task: str) -> bool:
        ok = is_correct(prediction, label, task)
        self.total += 1
        self.correct += ok
        self.unparsable += prediction is None
        return ok

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "unparsable": self.unparsable}


def score(texts: Iterable[str], labels: Iterable, task: str) -> Accuracy:
    acc = Accuracy()
    for text, label in zip(texts, labels):
        acc.add(extract_answer(text, task), label, task)
    return acc


class GenerationEvaluator:
    """Greedy generation on labelled records and task accuracy. Data-parallel replicas take
    interleaved slices; counts are summed over them."""

    def __init__(self, records, tokenizer, task: str, info, batch_size: int = 64, max_new_tokens: int = 256,
                 template: str = "default"):
        from engine.data import format_prompt

        self.task, self.tok, self.info = check_task(task), tokenizer, info
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        mine = records[info.dp_rank::info.dp_size]
        self.labels = [r.get("label") for r in mine]
        self.prompts = [tokenizer.encode(format_prompt(r["instruction"], template)) for r in mine]

    def texts(self, model) -> List[str]:
        from engine.generation import SamplingParams, fit_prompt, generate

        params = SamplingParams(max_new_tokens=self.max_new_tokens)
        stop = [self.tok.eos_id] if self.tok.eos_id is not None else []
        limit = max(1, model.args.max_seq_len - self.max_new_tokens)  # long prompts lose their beginning
        prompts = [fit_prompt(p, limit, self.tok.bos_id) for p in self.prompts]
        new = generate(model, prompts, params, stop, batch_size=self.batch_size)
        return [self.tok.decode([t for t in ids if t not in stop]) for ids in new]

    def __call__(self, model) -> dict:
        import torch
        import torch.distributed as dist

        from engine import distributed

        acc = score(self.texts(model), self.labels, self.task)
        counts = torch.tensor([acc.correct, acc.total, acc.unparsable], dtype=torch.float64,
                              device=model.head_weight.device)
        if dist.is_initialized() and self.info.dp_size > 1:
            dist.all_reduce(counts, group=distributed.dp_group())
        c, t, u = (int(x) for x in counts.tolist())
        return {"accuracy": c / t if t else 0.0, "correct": c, "total": t, "unparsable": u}
