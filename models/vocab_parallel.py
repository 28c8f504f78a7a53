"""Losses on vocabulary shards: next-token cross-entropy and T^2 KL(teacher || student) (or reverse KL, or
GKD's generalised JSD) from hidden states, chunk by chunk (no full logits), sharded log-softmax and top-k.

Each loss returns SUMS (and the trainer divides by counts taken over the whole optimizer step, across
data-parallel ranks and accumulation), so any split of a batch gives the same loss and gradient.
Logits are this rank's vocabulary shard [..., vocab / tp]; nothing gathers the full vocabulary.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.cross_entropy import vocab_parallel_cross_entropy

from models.parallel import (
    all_reduce_tp_,
    copy_to_tp,
    reduce_from_tp,
    vocab_shard_start,
)

IGNORE = -100  # the label of a position that takes no loss (PyTorch's ignore_index)


def token_cross_entropy(logits_local: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE.
    Note: consumes `logits_local` when it is already fp32 (fairscale subtracts the max in place)."""
    mask = labels != IGNORE
    per_token = vocab_parallel_cross_entropy(logits_local.float(), labels.clamp(min=0))
    return (per_token * mask).sum()


class _ChunkedHeadLoss(torch.autograd.Function):
    """Output projection + a loss of the logits, chunk by chunk over rows, on this rank's vocabulary
    shard: the one core of every loss computed from hidden states. Each chunk's fp32 logits live only
    while the chunk is processed: `chunk_loss(logits, s, e, want_grad)` returns the chunk's loss sum
    and its gradient in the logits (or None), so both gradients (times the weight / the hidden
    states) are formed in the forward and the backward only scales them; nothing is recomputed.
    hidden [N, dim], weight [vocab / tp, dim]."""

    @staticmethod
    def forward(ctx, hidden, weight, chunk_loss, chunk_rows):
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        want_grad = grad_h is not None or grad_w is not None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_rows):
            hc = hidden[s:s + chunk_rows]
            loss, g = chunk_loss(F.linear(hc, weight).float(), s, s + hc.shape[0], want_grad)
            total += loss
            if g is None:
                continue
            g = g.to(hc.dtype)
            if grad_h is not None:
                grad_h[s:s + chunk_rows] = all_reduce_tp_(g @ weight.to(hc.dtype))
            if grad_w is not None:
                grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0))
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


class _LogitsLoss(torch.autograd.Function):
    """A chunk loss (see _ChunkedHeadLoss) of logits already formed: this rank's shard [N, vocab / tp]."""

    @staticmethod
    def forward(ctx, logits_local, chunk_loss):
        loss, g = chunk_loss(logits_local.float().clone(), 0, logits_local.shape[0], logits_local.requires_grad)
        ctx.save_for_backward(g if g is not None else torch.empty(0))
        ctx.dtype = logits_local.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return (g * grad_out).to(ctx.dtype), None


def _default_chunk_rows(local_vocab: int) -> int:
    return max(64, (1 << 26) // local_vocab)  # about 2^26 fp32 logits per chunk


def cross_entropy_chunks(labels: torch.Tensor):
    """The chunk loss of next-token cross-entropy against `labels` [N] (IGNORE: no loss there): the sum
    of -log softmax(logits)[label] and its gradient softmax - one-hot (0 on rows without a label)."""

    def chunk(logits, s, e, want_grad):
        local_vocab = logits.shape[-1]
        start = vocab_shard_start(local_vocab)
        yc = labels[s:e]
        local = yc - start
        here = (local >= 0) & (local < local_vocab) & (yc != IGNORE)  # this rank holds the target
        index = local.clamp(0, local_vocab - 1)[:, None]
        logits -= all_reduce_tp_(logits.max(dim=-1).values, dist.ReduceOp.MAX)[:, None]
        target = all_reduce_tp_(torch.where(here, logits.gather(1, index).squeeze(1), 0.0))
        probs = logits.exp_()
        sum_exp = all_reduce_tp_(probs.sum(dim=-1))
        valid = (yc != IGNORE).to(probs.dtype)
        loss = ((sum_exp.log() - target) * valid).sum()
        if not want_grad:
            return loss, None
        probs /= sum_exp[:, None]
        probs.scatter_add_(1, index, -here.to(probs.dtype)[:, None])
        return loss, probs * valid[:, None]

    return chunk


def head_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                       chunk_rows: int = 0, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE, from final hidden
    states [B, T, dim] and this rank's head shard [vocab / tp, dim], never holding the logits of
    more than `chunk_rows` positions (default: about 2^26 logits). rows: the flat indices of the
    labelled positions (labelled_rows, known on the host), so prompt positions cost nothing. Equals
    token_cross_entropy(hidden @ head_weight.T, labels) in value and gradients."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if rows is not None:  # only the positions that have a label: the others add nothing
        h, y = h.index_select(0, rows), y.index_select(0, rows)
    return _ChunkedHeadLoss.apply(h, head_weight, cross_entropy_chunks(y),
                                  chunk_rows or _default_chunk_rows(head_weight.shape[0]))


def labelled_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions with a label, from host-side labels (no device sync)."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)


# ----------------------------------------------------------------------------------------------
# Log-softmax over the whole vocabulary from a shard (differentiable; e.g. the MI term's pooled distributions)
# ----------------------------------------------------------------------------------------------
def sharded_log_normalizer(scores_local: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(scores[..., v]) over the whole vocabulary, from this rank's shard [..., vocab/tp];
    replicated on every rank, differentiable. The max shift is a constant (no gradient needed)."""
    shift = all_reduce_tp_(scores_local.detach().amax(dim=-1), dist.ReduceOp.MAX)
    return shift + reduce_from_tp((scores_local - shift[..., None]).exp().sum(dim=-1)).log()


def sharded_log_softmax(scores_local: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the whole vocabulary, on this rank's shard: the replicated normaliser enters the
    shard through copy_to_tp, so its gradient sums over every rank's part of the vocabulary."""
    return scores_local - copy_to_tp(sharded_log_normalizer(scores_local))[..., None]


# ----------------------------------------------------------------------------------------------
# Distillation from the teacher's next-token distributions (train.py --objective teacher_kl)
# ----------------------------------------------------------------------------------------------
class SparseTarget(NamedTuple):
    """The teacher's distribution at each row as a few student token ids and their probabilities:
    ids [N, k] global student ids (-1: unused slot), probs [N, k] summing to 1 per row when
    renormalised, to at most 1 when they are the teacher's raw probabilities (--teacher_probs raw; a
    row whose probs sum to 0 has no target and contributes nothing). Ids may repeat (their mass adds up)."""

    ids: torch.Tensor
    probs: torch.Tensor


class DenseTarget(NamedTuple):
    """The teacher's full distribution at each row, from its final hidden states [N, dim_t] and its
    head shard [vocab / tp, dim_t] (the same tokenizer and vocabulary size as the student, so the
    shards hold the same ids). Projected chunk by chunk, like the student's. one_hot [N] (optional):
    where >= 0, the row learns that token one-hot instead of the teacher's distribution (the EOS under
    --eos_target one_hot)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    one_hot: Optional[torch.Tensor] = None


def _target_chunk(target, s: int, e: int, local_vocab: int, start: int, temperature: float, like: torch.Tensor):
    """This rank's shard of the teacher's probabilities at rows s:e [rows, vocab / tp] (fp32)."""
    if isinstance(target, DenseTarget):
        z = F.linear(target.hidden[s:e].to(target.weight.dtype), target.weight).float() / temperature
        z -= all_reduce_tp_(z.max(dim=-1).values, dist.ReduceOp.MAX)[:, None]
        log_norm = all_reduce_tp_(z.exp().sum(dim=-1)).log()
        p = (z - log_norm[:, None]).exp_()
        if target.one_hot is not None:
            oh = target.one_hot[s:e]
            local = oh - start
            here = (oh >= 0) & (local >= 0) & (local < local_vocab)
            p[oh >= 0] = 0.0
            p.scatter_add_(1, local.clamp(0, local_vocab - 1)[:, None], here.to(p.dtype)[:, None])
        return p
    ids, probs = target.ids[s:e], target.probs[s:e].float()
    local = ids - start
    here = (ids >= 0) & (local >= 0) & (local < local_vocab)
    p = torch.zeros_like(like)
    return p.scatter_add_(1, local.clamp(0, local_vocab - 1), torch.where(here, probs, 0.0))


def _kl_chunk(z: torch.Tensor, p: torch.Tensor, temperature: float, want_grad: bool):
    """T^2 KL(p || softmax(z / T)) summed over rows, and its gradient in the student logits z
    [rows, vocab / tp] (fp32, consumed): T (q * sum(p) - p), which is T (q - p) for a full target."""
    z /= temperature
    z -= all_reduce_tp_(z.max(dim=-1).values, dist.ReduceOp.MAX)[:, None]
    sum_exp = all_reduce_tp_(z.exp().sum(dim=-1))
    log_q = z - sum_exp.log()[:, None]
    per_row = all_reduce_tp_((torch.xlogy(p, p) - p * log_q).sum(dim=-1))
    loss = temperature ** 2 * per_row.sum()
    if not want_grad:
        return loss, None
    mass = all_reduce_tp_(p.sum(dim=-1))
    return loss, temperature * (log_q.exp_() * mass[:, None] - p)


def teacher_kl_chunks(target, temperature: float):
    """The chunk loss of T^2 KL(teacher || student) (_kl_chunk) against a SparseTarget or DenseTarget."""

    def chunk(z, s, e, want_grad):
        local_vocab = z.shape[-1]
        p = _target_chunk(target, s, e, local_vocab, vocab_shard_start(local_vocab), temperature, z)
        return _kl_chunk(z, p, temperature, want_grad)

    return chunk


# ----------------------------------------------------------------------------------------------
# The divergences a token-level objective can train on (--divergence, --jsd_beta): forward KL above,
# reverse KL (MiniLLM) and GKD's generalised Jensen-Shannon divergence, each T^2 times its value at
# temperature T, as TRL's GKDTrainer.generalized_jsd_loss defines them (trl 1.16.0,
# trl/experimental/gkd/gkd_trainer.py:238-318): beta 0 is KL(teacher || student), beta 1 KL(student ||
# teacher), in between beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q formed in
# log space. p: the teacher's distribution, q: the student's.
# ----------------------------------------------------------------------------------------------
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence_needs_full_support(divergence: str, beta: float) -> bool:
    """Whether the divergence is infinite wherever the teacher gives a token no mass (reverse KL, and
    the JSD at beta 1, which is reverse KL): it needs the teacher's full distribution."""
    return divergence == "reverse_kl" or (divergence == "jsd" and beta == 1)


def _sharded_log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the whole vocabulary of fp32 logits shards [rows, vocab / tp], in place."""
    z -= all_reduce_tp_(z.max(dim=-1).values, dist.ReduceOp.MAX)[:, None]
    z -= all_reduce_tp_(z.exp().sum(dim=-1)).log()[:, None]
    return z


def _target_log_chunk(target, s: int, e: int, local_vocab: int, start: int, temperature: float, like: torch.Tensor):
    """log p of this rank's shard at rows s:e (-inf where the teacher gives no mass): the teacher's
    log-softmax at T from its logits (a DenseTarget, one-hot rows 0 / -inf), or the log of a sparse
    target's probabilities."""
    if not isinstance(target, DenseTarget):
        return _target_chunk(target, s, e, local_vocab, start, temperature, like).log()
    z = F.linear(target.hidden[s:e].to(target.weight.dtype), target.weight).float() / temperature
    log_p = _sharded_log_softmax_(z)
    if target.one_hot is not None:
        oh = target.one_hot[s:e]
        cols = torch.arange(local_vocab, device=z.device) + start
        log_p = torch.where((oh >= 0)[:, None], torch.where(cols[None, :] == oh[:, None], 0.0, float("-inf")), log_p)
    return log_p


def _reverse_kl_chunk(z: torch.Tensor, log_p: torch.Tensor, temperature: float, want_grad: bool):
    """T^2 KL(q || p) summed over rows, q = softmax(z / T), and its gradient in z (fp32, consumed):
    T q (log q - log p - KL) (MiniLLM's divergence; p must give every token mass)."""
    log_q = _sharded_log_softmax_(z.div_(temperature))
    q = log_q.exp()
    per_row = all_reduce_tp_((q * (log_q - log_p)).sum(dim=-1))
    loss = temperature ** 2 * per_row.sum()
    if not want_grad:
        return loss, None
    return loss, temperature * q * (log_q - log_p - per_row[:, None])


def _jsd_chunk(z: torch.Tensor, log_p: torch.Tensor, beta: float, temperature: float, want_grad: bool):
    """T^2 [beta KL(p || m) + (1 - beta) KL(q || m)] summed over rows, m = beta p + (1 - beta) q (log m
    by logaddexp, as TRL), and its gradient in z: T (1 - beta) q (h - sum q h), h = log q - log m (the
    terms through m cancel: d JSD / d q = (1 - beta) log(q / m))."""
    log_q = _sharded_log_softmax_(z.div_(temperature))
    q = log_q.exp()
    log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
    p = log_p.exp()
    to_p = torch.where(p > 0, p * (log_p - log_m), 0.0)  # 0 log 0 = 0 where the teacher gives no mass
    h = log_q - log_m
    per_row = all_reduce_tp_((beta * to_p + (1 - beta) * q * h).sum(dim=-1))
    loss = temperature ** 2 * per_row.sum()
    if not want_grad:
        return loss, None
    mean_h = all_reduce_tp_((q * h).sum(dim=-1))
    return loss, temperature * (1 - beta) * q * (h - mean_h[:, None])


def divergence_chunks(target, temperature: float, divergence: str = "forward_kl", beta: float = 0.5):
    """The chunk loss of T^2 D(teacher, student) for --divergence forward_kl (teacher_kl_chunks itself),
    reverse_kl or jsd with beta (0: forward KL, 1: reverse KL, as TRL)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} is not one of {', '.join(DIVERGENCES)}")
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return teacher_kl_chunks(target, temperature)
    reverse = divergence == "reverse_kl" or beta == 1

    def chunk(z, s, e, want_grad):
        local_vocab = z.shape[-1]
        log_p = _target_log_chunk(target, s, e, local_vocab, vocab_shard_start(local_vocab), temperature, z)
        if reverse:
            return _reverse_kl_chunk(z, log_p, temperature, want_grad)
        return _jsd_chunk(z, log_p, beta, temperature, want_grad)

    return chunk


def head_divergence(hidden: torch.Tensor, head_weight: torch.Tensor, target, temperature: float = 1.0,
                    divergence: str = "forward_kl", beta: float = 0.5, chunk_rows: int = 0) -> torch.Tensor:
    """Sum over rows of T^2 D(P_teacher,T, P_student,T) (divergence_chunks), from the student's hidden
    states [N, dim] and head shard, chunk by chunk like head_teacher_kl (which is its forward_kl)."""
    return _ChunkedHeadLoss.apply(hidden, head_weight, divergence_chunks(target, float(temperature), divergence,
                                                                         float(beta)),
                                  chunk_rows or _default_chunk_rows(head_weight.shape[0]))


def logits_divergence(logits_local: torch.Tensor, target, temperature: float = 1.0, divergence: str = "forward_kl",
                      beta: float = 0.5) -> torch.Tensor:
    """head_divergence from the student's logits shard [N, vocab / tp] (a head that is not one matrix)."""
    return _LogitsLoss.apply(logits_local, divergence_chunks(target, float(temperature), divergence, float(beta)))


def head_teacher_kl(hidden: torch.Tensor, head_weight: torch.Tensor, target, temperature: float = 1.0,
                    chunk_rows: int = 0) -> torch.Tensor:
    """Sum over rows of T^2 KL(P_teacher,T || P_student,T), both distributions softened by the
    temperature T (the T^2 keeps the gradient's scale independent of T, as in Hinton et al.).

    hidden: the student's final hidden states at the rows [N, dim]; head_weight: this rank's head
    shard [vocab / tp, dim]; target: SparseTarget or DenseTarget (already in the student's
    vocabulary). Never holds the logits of more than `chunk_rows` rows (default: about 2^26 logits)
    nor gathers the vocabulary: max, normaliser and the sums are all-reduced over the shards."""
    return _ChunkedHeadLoss.apply(hidden, head_weight, teacher_kl_chunks(target, float(temperature)),
                                  chunk_rows or _default_chunk_rows(head_weight.shape[0]))


def logits_teacher_kl(logits_local: torch.Tensor, target, temperature: float = 1.0) -> torch.Tensor:
    """head_teacher_kl from the student's logits shard [N, vocab / tp] (a head that is not one matrix)."""
    return _LogitsLoss.apply(logits_local, teacher_kl_chunks(target, float(temperature)))


def sharded_token_logprobs(logits_local: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[row, ids[row]] over the whole vocabulary, from vocabulary-sharded logits
    [N, vocab / tp] and global ids [N] (fp32, replicated; the logits are not modified)."""
    z = logits_local.float()
    local_vocab = z.shape[-1]
    m = all_reduce_tp_(z.max(dim=-1).values.clone(), dist.ReduceOp.MAX)
    log_norm = all_reduce_tp_((z - m[:, None]).exp().sum(dim=-1)).log() + m
    local = ids - vocab_shard_start(local_vocab)
    here = (local >= 0) & (local < local_vocab)
    picked = z.gather(1, local.clamp(0, local_vocab - 1)[:, None]).squeeze(1)
    return all_reduce_tp_(torch.where(here, picked, 0.0)) - log_norm


def ranking_key(values: torch.Tensor, ids: torch.Tensor, vocab: int, non_negative: bool = False) -> torch.Tensor:
    """An int64 key per float32 value whose descending order is the values', equal ones by ascending
    id (a stable descending sort's order), for torch.topk, which orders and picks among equal values
    as it likes: floats order as their bits once a negative one's magnitude bits are negated
    (non_negative: none are, e.g. probabilities; the pass that negates is skipped)."""
    bits = values.float().contiguous().view(torch.int32).long()
    if not non_negative:
        bits = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return torch.add(vocab - 1 - ids, bits, alpha=vocab)


def sharded_topk(logits_local: torch.Tensor, k: int):
    """The k most likely tokens of each row from vocabulary-sharded logits [N, vocab / tp]: (global
    ids [N, k] long, log-probabilities [N, k] fp32, descending, equal ones by id, however the
    vocabulary is sharded). Each rank takes its own top k, the candidates (k x tp per row, never the
    vocabulary) are gathered and the best k kept."""
    from fairscale.nn.model_parallel.initialize import (
        get_model_parallel_group,
        get_model_parallel_world_size,
    )

    z = logits_local.float()
    local_vocab = z.shape[-1]
    m = all_reduce_tp_(z.max(dim=-1).values.clone(), dist.ReduceOp.MAX)
    log_norm = all_reduce_tp_((z - m[:, None]).exp().sum(dim=-1)).log() + m
    tp = get_model_parallel_world_size()
    vocab = local_vocab * tp
    ids = torch.arange(local_vocab, device=z.device) + vocab_shard_start(local_vocab)
    pick = ranking_key(z, ids, vocab).topk(min(k, local_vocab), dim=-1).indices
    values, ids = z.gather(1, pick), ids[pick]
    if tp > 1:
        group = get_model_parallel_group()
        all_v, all_i = [torch.empty_like(values) for _ in range(tp)], [torch.empty_like(ids) for _ in range(tp)]
        dist.all_gather(all_v, values.contiguous(), group=group)
        dist.all_gather(all_i, ids.contiguous(), group=group)
        values, ids = torch.cat(all_v, dim=-1), torch.cat(all_i, dim=-1)
        pick = ranking_key(values, ids, vocab).topk(k, dim=-1).indices
        values, ids = values.gather(1, pick), ids.gather(1, pick)
    return ids, values - log_norm[:, None]
