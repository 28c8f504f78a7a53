"""Tasks glue data to objectives for the trainer (see engine/trainer.py for the interface)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from engine.data import IGNORE, SFTData, pad_batch
from engine.errors import UserError
from engine.objectives import (
    head_cross_entropy,
    mcc_kl_sum,
    span_prediction_positions,
    to_device,
    token_cross_entropy,
)


def response_cross_entropy(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE of the labelled positions: chunk by chunk from the hidden states (no
    full logits), or from the logits when the head is not one matrix (LoRA dropout on the head)."""
    head = model.head_matrix()
    if head is None:
        return token_cross_entropy(model.logits(hidden, gather=False), labels)
    return head_cross_entropy(hidden, head, labels)


@dataclass
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    counts: Dict[str, float]
    n_tokens: int
    extra: dict = field(default_factory=dict)


class SFTTask:
    """Supervised training on teacher rationales: mean next-token cross-entropy over response tokens."""

    weights = {"ce": 1.0}

    def __init__(self, data: SFTData, device):
        self.data, self.device = data, device
        self.pad_id = data.tok.padding_id

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def lengths(self, epoch: int) -> List[int]:
        return [min(self.data.full_length(i, epoch), self.data.max_seq_len) for i in self.data.keep]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        pairs = [self.data.example(self.data.keep[p], epoch) for p in positions]
        inputs, labels = pad_batch(pairs, self.pad_id)
        return Batch(to_device(inputs, self.device), to_device(labels, self.device),
                     {"ce": int((labels != IGNORE).sum())}, sum(len(x) for x, _ in pairs))

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        hidden = model.forward_hidden(batch.inputs)
        return {"ce": response_cross_entropy(model, hidden, batch.labels)}


class MCCTask:
    """MCC-KD: cross-entropy on every rationale + alpha x symmetric KL between the answer-span
    predictions of each pair of rationales of the same question (engine.objectives.mcc_kd_sums)."""

    def __init__(self, data, device, alpha: float, temperature: float):
        self.check(alpha, temperature)
        self.data, self.device, self.temperature = data, device, temperature
        self.weights = {"ce": 1.0, "kl": alpha}
        self.pad_id = data.tok.padding_id

    @staticmethod
    def check(alpha: float, temperature: float, num_rationales: int = 2) -> None:
        if num_rationales < 2:
            raise UserError(f"--num_rationales must be >= 2, got {num_rationales}")
        if alpha < 0:
            raise UserError(f"--alpha must be >= 0, got {alpha}")
        if temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {temperature}")

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def lengths(self, epoch: int) -> List[int]:
        return [self.data.length(q, epoch) for q in self.data.keep]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        seqs, pairs = [], []
        for p in positions:
            q = self.data.keep[p]
            rows = []
            for j in self.data.choose(q, epoch):
                x, y, (s, e) = self.data.example(q, j)
                rows.append((len(seqs), span_prediction_positions(s, e)))
                seqs.append((x, y))
            pairs += [(ra, pa, rb, pb) for n, (ra, pa) in enumerate(rows) for rb, pb in rows[n + 1:]]
        inputs, labels = pad_batch(seqs, self.pad_id)
        return Batch(to_device(inputs, self.device), to_device(labels, self.device),
                     {"ce": int((labels != IGNORE).sum()), "kl": len(pairs)}, sum(len(x) for x, _ in seqs),
                     {"pairs": pairs})

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        hidden = model.forward_hidden(batch.inputs)
        kl = mcc_kl_sum(lambda rows, pos: model.logits(hidden[rows, pos]), batch.extra["pairs"], self.temperature,
                        hidden.device)
        return {"ce": response_cross_entropy(model, hidden, batch.labels), "kl": kl}


def group_by_format(task, record_groups) -> str:
    """Give the task one group per example (its records' data format, engine.data.format_groups):
    the trainer then forms every batch from one group and leaves out examples whose group is None.
    Returns a line saying so ("" when the records carry no formats)."""
    if record_groups is None:
        return ""
    task.groups = [record_groups[i] for i in task.data.keep]
    counts = {g: task.groups.count(g) for g in sorted(set(task.groups) - {None})}
    left_out = task.groups.count(None)
    return ("one data format per batch: " + ", ".join(f"{g} {n}" for g, n in counts.items())
            + (f" examples ({left_out} of other formats left out)" if left_out else " examples"))


class TeacherKLTask(SFTTask):
    """Distillation from the teacher's distributions: on every response token, the cross-entropy of
    the student's token (`ce`) and T^2 KL(teacher || student) at temperature T (`kl`), weighted
    (1 - w) and w. The teacher (engine/teacher.py) is a top-k file or a frozen checkpoint run here."""

    def __init__(self, data: SFTData, device, teacher, kl_weight: float, temperature: float):
        super().__init__(data, device)
        self.teacher, self.temperature = teacher, temperature
        self.weights = {"ce": 1.0 - kl_weight, "kl": kl_weight}

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        from engine.teacher import kl_rows

        items = [(self.data.keep[p], self.data.choice(self.data.keep[p], epoch)) for p in positions]
        pairs = [self.data.example(i, epoch, w) for i, w in items]
        inputs, labels = pad_batch(pairs, self.pad_id)
        rows, own, counts = kl_rows(labels)
        extra = {"rows": to_device(torch.tensor(rows, dtype=torch.long), self.device),
                 "own": to_device(torch.tensor(own, dtype=torch.long), self.device),
                 **self.teacher.batch_extra(items, counts, self.device)}
        return Batch(to_device(inputs, self.device), to_device(labels, self.device),
                     {"ce": len(rows), "kl": len(rows)}, sum(len(x) for x, _ in pairs), extra)

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        from engine.objectives import head_teacher_kl, logits_teacher_kl

        target = self.teacher.target(batch)  # first: an online teacher's forward holds no student activations
        hidden = model.forward_hidden(batch.inputs)
        ce = response_cross_entropy(model, hidden, batch.labels)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.extra["rows"])
        head = model.head_matrix()
        if head is None:
            kl = logits_teacher_kl(model.logits(h, gather=False), target, self.temperature)
        else:
            kl = head_teacher_kl(h, head, target, self.temperature)
        return {"ce": ce, "kl": kl}
