"""The MCC-KD task: cross-entropy on every rationale plus the consistency of their answer spans."""
from __future__ import annotations

from typing import Dict, List

import torch

from engine.distill.mcc.losses import mcc_kl_sum, span_prediction_positions
from engine.runtime.errors import UserError
from engine.text.sequences import IGNORE, pad_batch
from engine.train.task import Batch, Task, make_batch, response_cross_entropy


class MCCTask(Task):
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

    def example_records(self) -> List[int]:
        return self.data.keep

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
