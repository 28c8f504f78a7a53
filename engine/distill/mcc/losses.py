"""The MCC-KD consistency term: symmetric KL between the answer-span predictions of rationale pairs,
and the cross-entropy of the rationales, reduced per token (ours) or per rationale (the authors')."""

from __future__ import annotations

from typing import List

import torch

from engine.runtime.distributed import to_device
from engine.train.task import response_cross_entropy
from models.parallel import gather_from_tp
from models.vocab_parallel import token_cross_entropy

SPAN_LOGITS = ("ours", "authors")
CE_REDUCTIONS = ("token", "sequence")


def symmetric_kl_pairs(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """MCC-KD consistency of rationale pairs: 0.5 (KL(P_a || P_b) + KL(P_b || P_a)) between the
    temperature-softened token distributions (T on both sides), averaged over each pair's valid span
    positions.

    logits_a, logits_b: [pairs, span, vocab] FULL-vocabulary logits at the span positions
    (span_positions); mask: [pairs, span] valid positions. Returns [pairs]. Both branches receive
    gradient."""
    la = torch.log_softmax(logits_a.float() / temperature, dim=-1)
    lb = torch.log_softmax(logits_b.float() / temperature, dim=-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    per_pos = 0.5 * (kl_ab + kl_ba) * mask
    return per_pos.sum(-1) / mask.sum(-1).clamp(min=1)


def span_positions(span_start: int, span_end: int, span_logits: str = "ours") -> List[int]:
    """The positions whose logits the consistency term compares for the answer tokens
    [span_start, span_end) of a sequence. ours: the predictions OF the span tokens (one position
    earlier each); authors: the logits AT the span positions, which predict the tokens one later
    (the last prediction is of the token after the span), as the MCC-KD code slices them."""
    if span_logits == "authors":
        return list(range(span_start, span_end))
    return list(range(span_start - 1, span_end - 1))


def span_prediction_positions(span_start: int, span_end: int) -> List[int]:
    """Positions whose logits predict tokens span_start..span_end-1 (span_positions, ours)."""
    return span_positions(span_start, span_end, "ours")


def mcc_kl_sum(span_logits, pairs, temperature: float, device) -> torch.Tensor:
    """Sum over rationale pairs of the MCC-KD consistency (symmetric_kl_pairs).

    span_logits(rows, positions): FULL-vocabulary logits [pairs, span, vocab] at those [pairs, span]
    index tensors (only these positions are ever gathered across tensor-parallel ranks).
    pairs: list of (row_a, positions_a, row_b, positions_b), positions from span_positions and of
    equal length within a pair."""
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


def sequence_mean_cross_entropy(model, hidden: torch.Tensor, labels: torch.Tensor, row_rows) -> torch.Tensor:
    """Sum over the rows of each row's mean next-token CE over its labelled positions (a row without
    any adds nothing): divided by the number of rows, every rationale weighs the same whatever its
    length. row_rows: per row, the indices of its labelled positions (found on the host)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for b, rows in enumerate(row_rows):
        if rows.numel():
            total = total + response_cross_entropy(model, hidden[b : b + 1], labels[b : b + 1], rows) / rows.numel()
    return total


def mcc_kd_sums(logits_local: torch.Tensor, labels: torch.Tensor, pairs, temperature: float):
    """CE and consistency sums for a batch of rationales of the same questions, from logits.

    logits_local: [B, T, vocab/tp] this rank's vocabulary shard; labels: [B, T] next-token labels.
    Only the span positions are gathered to the full vocabulary; the CE stays vocabulary-parallel.
    Returns (ce_sum, kl_sum over pairs)."""
    # the spans are gathered BEFORE the cross-entropy, which shifts fp32 logits in place
    kl_sum = mcc_kl_sum(lambda rows, pos: gather_from_tp(logits_local[rows, pos]), pairs, temperature,
                        logits_local.device)
    return token_cross_entropy(logits_local, labels), kl_sum
