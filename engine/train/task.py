"""Tasks glue data to objectives for the trainer (see engine/train/trainer.py for the interface)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from models.vocab_parallel import head_cross_entropy, labelled_rows, token_cross_entropy
from engine.runtime.distributed import to_device


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


