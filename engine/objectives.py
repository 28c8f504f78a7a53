"""Training objectives: small pure functions of (vocabulary-sharded) logits.

Each returns SUMS (and the trainer divides by counts taken over the whole optimizer step, across
data-parallel ranks and accumulation), so any split of a batch gives the same loss and gradient.
Logits are this rank's vocabulary shard [..., vocab / tp]; nothing gathers the full vocabulary.
"""
from __future__ import annotations

import torch
from fairscale.nn.model_parallel.cross_entropy import vocab_parallel_cross_entropy

from engine.data import IGNORE


def token_cross_entropy(logits_local: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE.
    Note: consumes `logits_local` when it is already fp32 (fairscale subtracts the max in place)."""
    mask = labels != IGNORE
    per_token = vocab_parallel_cross_entropy(logits_local.float(), labels.clamp(min=0))
    return (per_token * mask).sum()
