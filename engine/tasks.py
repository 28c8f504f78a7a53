"""Tasks glue data to objectives for the trainer (see engine/trainer.py for the interface)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from engine.data import IGNORE, SFTData, pad_batch
from engine.errors import UserError
from engine.objectives import (
    head_cross_entropy,
    labelled_rows,
    mcc_kl_sum,
    span_prediction_positions,
    to_device,
    token_cross_entropy,
)


def response_cross_entropy(model, hidden: torch.Tensor, labels: torch.Tensor,
                           rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Summed next-token CE of the labelled positions: chunk by chunk from the hidden states of those
    positions only (no full logits), or from the logits when the head is not one matrix (LoRA
    dropout on the head)."""
    head = model.head_matrix()
    if head is None:
        return token_cross_entropy(model.logits(hidden, gather=False), labels)
    return head_cross_entropy(hidden, head, labels, rows=rows)


def make_batch(inputs: torch.Tensor, labels: torch.Tensor, device, counts: Dict[str, float], n_tokens: int,
               extra: Optional[dict] = None) -> "Batch":
    """A batch on the device, with the labelled positions found on the host."""
    return Batch(to_device(inputs, device), to_device(labels, device), counts, n_tokens, extra or {},
                 to_device(labelled_rows(labels), device))


@dataclass
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    counts: Dict[str, float]
    n_tokens: int
    extra: dict = field(default_factory=dict)
    label_rows: Optional[torch.Tensor] = None  # flat indices of the labelled positions (None: all)


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
        return make_batch(inputs, labels, self.device, {"ce": int((labels != IGNORE).sum())},
                          sum(len(x) for x, _ in pairs))

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        hidden = model.forward_hidden(batch.inputs)
        return {"ce": response_cross_entropy(model, hidden, batch.labels, batch.label_rows)}


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
        return make_batch(inputs, labels, self.device, {"ce": int((labels != IGNORE).sum()), "kl": len(pairs)},
                          sum(len(x) for x, _ in seqs), {"pairs": pairs})

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        hidden = model.forward_hidden(batch.inputs)
        kl = mcc_kl_sum(lambda rows, pos: model.logits(hidden[rows, pos]), batch.extra["pairs"], self.temperature,
                        hidden.device)
        return {"ce": response_cross_entropy(model, hidden, batch.labels, batch.label_rows), "kl": kl}
