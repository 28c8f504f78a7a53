"""The mutual-information term of CoT distillation (Chen et al. 2024) between the label and rationale passes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.runtime.distributed import to_device
from engine.text.sequences import IGNORE
from models.parallel import copy_to_tp, reduce_from_tp
from models.vocab_parallel import sharded_log_normalizer, sharded_log_softmax


def pooled_log_distribution(logits_local: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The authors' pooled prediction of a sequence, done right: per position the log-probabilities
    over the whole vocabulary, max-pooled over the REAL positions only (mask [B, W]: padding never
    enters), then normalised to a distribution. Returns its log [B, vocab/tp] (this rank's shard).
    log max_t p_t(v) is a max of log-probabilities, so nothing underflows."""
    logp = sharded_log_softmax(logits_local.float())
    pooled = logp.masked_fill(~mask.bool()[..., None], float("-inf")).amax(dim=1)
    return pooled - copy_to_tp(sharded_log_normalizer(pooled))[:, None]


def pooled_ce_mi_sum(label_logits: torch.Tensor, label_mask: torch.Tensor, rationale_logits: torch.Tensor,
                     rationale_mask: torch.Tensor) -> torch.Tensor:
    """The `pooled_ce` estimator of the MI term, summed over examples: the cross-entropy
    -sum_v P(v) log Q(v) of the rationale pass's pooled distribution Q against the label pass's P
    (pooled_log_distribution of each), P detached (the label task is the target, trained by its own CE).

    label_logits [B, Wl, vocab/tp], rationale_logits [B, Wr, vocab/tp]: this rank's vocabulary shard
    at the response positions of each example (padded; masks [B, Wl] / [B, Wr] say which are real).
    The authors softmaxed, max-pooled over padding too, and fed those probabilities to a
    cross-entropy that expects logits; here every step works on log-probabilities. An example
    without a real position in either pass contributes 0. Returns a replicated scalar."""
    valid = label_mask.bool().any(1) & rationale_mask.bool().any(1)
    with torch.no_grad():
        target = pooled_log_distribution(label_logits.detach(), _or_first(label_mask, valid)).exp()
    log_q = pooled_log_distribution(rationale_logits, _or_first(rationale_mask, valid))
    per_example = reduce_from_tp(-(target * log_q).sum(dim=-1))
    return (per_example * valid).sum()


def _or_first(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The mask, with rows that are not `valid` reading their first position (finite, then weighted 0)."""
    fallback = torch.zeros_like(mask, dtype=torch.bool)
    fallback[:, 0] = True
    return torch.where(valid[:, None], mask.bool(), fallback)


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden states [B, T, D] over the positions where mask [B, T] is true; [B, D] in fp32."""
    m = mask.to(torch.float32)[..., None]
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def infonce_sum(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over a batch, summed: for each anchor i (a rationale-pass representation) the
    cross-entropy of picking its own candidate i (the label-pass representation of the same question)
    among all candidates of the batch, by cosine similarity / temperature. log B minus the mean of
    this loss is the estimator's lower bound on the mutual information. anchors, candidates: [B, d]."""
    a = F.normalize(anchors.float(), dim=-1)
    c = F.normalize(candidates.float(), dim=-1)
    scores = a @ c.t() / temperature
    return F.cross_entropy(scores, torch.arange(len(a), device=a.device), reduction="sum")


MI_ESTIMATORS = ("pooled_ce", "critic")


CRITIC_TEMPERATURE = 0.1  # InfoNCE's cosine-similarity temperature (SimCLR's order of magnitude)


class MICritic(torch.nn.Module):
    """The learned variational critic of the `critic` MI estimator: one small projection head, shared by
    both tasks, mapping a pooled hidden state [*, dim] to [*, proj_dim] (compared by cosine similarity).
    Initialised from `seed` alone, so every rank starts with the same weights; kept in fp32."""

    def __init__(self, dim: int, seed: int, device, proj_dim: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, proj_dim))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                bound = layer.in_features ** -0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=g))
                layer.bias.zero_()
        self.to(device)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled.float())


def response_positions(labels: torch.Tensor, device):
    """(rows [B, W], positions [B, W], mask [B, W]) of the positions whose next token is a response
    token (the positions the cross-entropy covers), each row padded with its last position; from
    host-side labels, so the training step waits for nothing."""
    keep = labels != IGNORE
    width = max(1, int(keep.sum(1).max()))
    rows, cols, mask = [], [], []
    for b in range(labels.shape[0]):
        pos = keep[b].nonzero().flatten().tolist() or [0]
        n = int(keep[b].sum())
        cols.append(pos + [pos[-1]] * (width - len(pos)))
        mask.append([True] * n + [False] * (width - n))
        rows.append([b] * width)
    return tuple(to_device(torch.tensor(x), device) for x in (rows, cols, mask))
