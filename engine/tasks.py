"""Tasks glue data to objectives for the trainer (see engine/trainer.py for the interface)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from engine.data import IGNORE, SFTData, pad_batch
from engine.objectives import token_cross_entropy


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
        return Batch(inputs.to(self.device), labels.to(self.device), {"ce": int((labels != IGNORE).sum())},
                     sum(len(x) for x, _ in pairs))

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        return {"ce": token_cross_entropy(model(batch.inputs, gather=False), batch.labels)}
