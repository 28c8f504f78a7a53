"""Training objectives: small pure functions of (vocabulary-sharded) logits.

Each returns SUMS (and the trainer divides by counts taken over the whole optimizer step, across
data-parallel ranks and accumulation), so any split of a batch gives the same loss and gradient.
Logits are this rank's vocabulary shard [..., vocab / tp]; nothing gathers the full vocabulary.
"""
from __future__ import annotations

import torch
from fairscale.nn.model_parallel.cross_entropy import vocab_parallel_cross_entropy

from engine.data import IGNORE
from models.parallel import gather_from_tp


def token_cross_entropy(logits_local: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE.
    Note: consumes `logits_local` when it is already fp32 (fairscale subtracts the max in place)."""
    mask = labels != IGNORE
    per_token = vocab_parallel_cross_entropy(logits_local.float(), labels.clamp(min=0))
    return (per_token * mask).sum()


def symmetric_kl_pairs(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """MCC-KD consistency of rationale pairs: 0.5 (KL(P_a || P_b) + KL(P_b || P_a)) between the
    temperature-softened token distributions, averaged over each pair's valid span positions.

    logits_a, logits_b: [pairs, span, vocab] FULL-vocabulary logits that PREDICT the answer-span
    tokens (taken one position before each span token); mask: [pairs, span] valid positions.
    Returns [pairs]. Both branches receive gradient."""
    la = torch.log_softmax(logits_a.float() / temperature, dim=-1)
    lb = torch.log_softmax(logits_b.float() / temperature, dim=-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    per_pos = 0.5 * (kl_ab + kl_ba) * mask
    return per_pos.sum(-1) / mask.sum(-1).clamp(min=1)


def span_prediction_positions(span_start: int, span_end: int):
    """Positions whose logits predict tokens span_start..span_end-1: one earlier each (the seed's
    code compared the logits AT the span positions, which predict the next tokens instead)."""
    return list(range(span_start - 1, span_end - 1))


def mcc_kd_sums(logits_local: torch.Tensor, labels: torch.Tensor, pairs, temperature: float):
    """CE and consistency sums for a batch of rationales of the same questions.

    logits_local: [B, T, vocab/tp] this rank's vocabulary shard; labels: [B, T] next-token labels.
    pairs: list of (row_a, positions_a, row_b, positions_b), positions already shifted (see
    span_prediction_positions) and of equal length. Only the span positions are gathered to the full
    vocabulary; the CE stays vocabulary-parallel. Returns (ce_sum, kl_sum over pairs)."""
    kl_sum = logits_local.new_zeros((), dtype=torch.float32)
    if pairs:
        width = max(len(p[1]) for p in pairs)
        rows_a, pos_a, rows_b, pos_b, mask = [], [], [], [], []
        for ra, pa, rb, pb in pairs:
            pad = width - len(pa)
            rows_a.append([ra] * width)
            rows_b.append([rb] * width)
            pos_a.append(list(pa) + [pa[-1]] * pad)
            pos_b.append(list(pb) + [pb[-1]] * pad)
            mask.append([1.0] * len(pa) + [0.0] * pad)
        dev = logits_local.device
        idx = lambda v: torch.tensor(v, device=dev)  # noqa: E731
        # gathered BEFORE the cross-entropy, which shifts fp32 logits in place
        span_a = gather_from_tp(logits_local[idx(rows_a), idx(pos_a)])
        span_b = gather_from_tp(logits_local[idx(rows_b), idx(pos_b)])
        kl_sum = symmetric_kl_pairs(span_a, span_b, idx(mask), temperature).sum()
    return token_cross_entropy(logits_local, labels), kl_sum
