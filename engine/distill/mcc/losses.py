"""The MCC-KD consistency term: symmetric KL between the answer-span predictions of rationale pairs."""
from __future__ import annotations

import torch

from engine.runtime.distributed import to_device
from models.parallel import gather_from_tp
from models.vocab_parallel import token_cross_entropy


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


def mcc_kl_sum(span_logits, pairs, temperature: float, device) -> torch.Tensor:
    """Sum over rationale pairs of the MCC-KD consistency (symmetric_kl_pairs).

    span_logits(rows, positions): FULL-vocabulary logits [pairs, span, vocab] at those [pairs, span]
    index tensors (only these positions are ever gathered across tensor-parallel ranks).
    pairs: list of (row_a, positions_a, row_b, positions_b), positions already shifted (see
    span_prediction_positions) and of equal length within a pair."""
    if not pairs:
        return torch.zeros((), dtype=torch.float32, device=device)
    width = max(len(p[1]) for p in pairs)
    rows_a, pos_a, rows_b, pos_b, mask = [], [], [], [], []
    for ra, pa, rb, pb in pairs:
        pad = width - len(pa)
        rows_a.append([ra] * width)
        rows_b.append([rb] * width)
        pos_a.append(list(pa) + [pa[-1]] * pad)
        pos_b.append(list(pb) + [pb[-1]] * pad)
        mask.append([1.0] * len(pa) + [0.0] * pad)
    rows_a, pos_a, rows_b, pos_b, mask = (to_device(torch.tensor(v), device) for v in (rows_a, pos_a, rows_b, pos_b, mask))
    return symmetric_kl_pairs(span_logits(rows_a, pos_a), span_logits(rows_b, pos_b), mask, temperature).sum()


def mcc_kd_sums(logits_local: torch.Tensor, labels: torch.Tensor, pairs, temperature: float):
    """CE and consistency sums for a batch of rationales of the same questions, from logits.

    logits_local: [B, T, vocab/tp] this rank's vocabulary shard; labels: [B, T] next-token labels.
    Only the span positions are gathered to the full vocabulary; the CE stays vocabulary-parallel.
    Returns (ce_sum, kl_sum over pairs)."""
    # the spans are gathered BEFORE the cross-entropy, which shifts fp32 logits in place
    kl_sum = mcc_kl_sum(lambda rows, pos: gather_from_tp(logits_local[rows, pos]), pairs, temperature,
                        logits_local.device)
    return token_cross_entropy(logits_local, labels), kl_sum
