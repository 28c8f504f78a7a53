"""The MCC-KD task: cross-entropy on every rationale plus the consistency of their answer spans."""
from __future__ import annotations

from typing import Dict, List

import torch

from engine.distill.mcc.losses import (
    CE_REDUCTIONS,
    SPAN_LOGITS,
    mcc_kl_sum,
    sequence_mean_cross_entropy,
    span_positions,
)
from engine.runtime.distributed import to_device
from engine.runtime.errors import UserError
from engine.text.sequences import IGNORE, pad_batch
from engine.train.task import Batch, RecordsTask, make_batch, response_cross_entropy


class MCCTask(RecordsTask):
    """MCC-KD: cross-entropy on every rationale + alpha x symmetric KL between the answer-span
    logits of each pair of rationales of the same question (engine/distill/mcc/losses.py).

    span_logits: which logits are compared (span_positions: ours, or the authors' one token late);
    ce_reduction: token (the step's token mean) or sequence (the mean over rationales of their token
    means, the authors'). The consistency term is the mean over pairs of each pair's mean over its
    span positions, as the authors' (their code averages per example, then over the batch)."""

    def __init__(
        self, data, device, alpha: float, temperature: float, span_logits: str = "ours", ce_reduction: str = "token"
    ):
        self.check(alpha, temperature, 2, span_logits, ce_reduction)
        self.data, self.device, self.temperature = data, device, temperature
        self.span_logits, self.ce_reduction = span_logits, ce_reduction
        self.weights = {"ce": 1.0, "kl": alpha}
        self.pad_id = data.tok.padding_id

    @staticmethod
    def check(
        alpha: float,
        temperature: float,
        num_rationales: int = 2,
        span_logits: str = "ours",
        ce_reduction: str = "token",
    ) -> None:
        if num_rationales < 2:
            raise UserError(f"--num_rationales must be >= 2, got {num_rationales}")
        if alpha < 0:
            raise UserError(f"--alpha must be >= 0, got {alpha}")
        if temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {temperature}")
        if span_logits not in SPAN_LOGITS:
            raise UserError(f"--span_logits must be ours or authors, got {span_logits!r}")
        if ce_reduction not in CE_REDUCTIONS:
            raise UserError(f"--ce_reduction must be token or sequence, got {ce_reduction!r}")

    def lengths(self, epoch: int) -> List[int]:
        return [self.data.length(q, epoch) for q in self.data.keep]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        seqs, pairs = [], []
        for p in positions:
            q = self.data.keep[p]
            rows = []
            for j in self.data.choose(q, epoch):
                x, y, (s, e) = self.data.example(q, j)
                rows.append((len(seqs), span_positions(s, e, self.span_logits)))
                seqs.append((x, y))
            pairs += [(ra, pa, rb, pb) for n, (ra, pa) in enumerate(rows) for rb, pb in rows[n + 1:]]
        inputs, labels = pad_batch(seqs, self.pad_id)
        extra = {"pairs": pairs}
        if self.ce_reduction == "sequence":  # each row's labelled positions, found here on the host
            extra["row_rows"] = [to_device((row != IGNORE).nonzero().squeeze(1), self.device) for row in labels]
            ce_count = len(seqs)
        else:
            ce_count = int((labels != IGNORE).sum())
        return make_batch(
            inputs, labels, self.device, {"ce": ce_count, "kl": len(pairs)}, sum(len(x) for x, _ in seqs), extra
        )

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        hidden = model.forward_hidden(batch.inputs)
        kl = mcc_kl_sum(
            lambda rows, pos: model.logits(hidden[rows, pos]), batch.extra["pairs"], self.temperature, hidden.device
        )
        if self.ce_reduction == "sequence":
            ce = sequence_mean_cross_entropy(model, hidden, batch.labels, batch.extra["row_rows"])
        else:
            ce = response_cross_entropy(model, hidden, batch.labels, batch.label_rows)
        return {"ce": ce, "kl": kl}
