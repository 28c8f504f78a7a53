"""Token sequences for training and scoring: the label convention, padding, seeded draws."""
from __future__ import annotations

import random
import zlib

import torch

from models.vocab_parallel import IGNORE  # noqa: F401  (the label convention, owned by the losses)


def stable_rng(*parts):
    return random.Random(zlib.crc32(repr(parts).encode()))


def pad_batch(pairs, pad_id: int):
    """[(input_ids, labels)] -> LongTensors [B, T] right-padded (labels padded with IGNORE)."""
    width = max(len(x) for x, _ in pairs)
    inputs = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for b, (x, y) in enumerate(pairs):
        inputs[b, : len(x)] = torch.tensor(x)
        labels[b, : len(y)] = torch.tensor(y)
    return inputs, labels
