"""The mutual-information term of CoT distillation (Chen et al. 2024) between the label and rationale passes."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from engine.runtime.distributed import to_device
from engine.text.sequences import IGNORE
from models.parallel import copy_to_tp, reduce_from_tp
from models.vocab_parallel import sharded_log_normalizer, sharded_log_softmax


def pooled_log_distribution(logits_local: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Our pooled prediction of a sequence (the `pooled_distribution_ce` estimator): per position the
    log-probabilities over the whole vocabulary, max-pooled over the REAL positions only (mask [B, W]:
    padding never enters), then normalised to a distribution. Returns its log [B, vocab/tp] (this
    rank's shard). log max_t p_t(v) is a max of log-probabilities, so nothing underflows."""
    logp = sharded_log_softmax(logits_local.float())
    pooled = logp.masked_fill(~mask.bool()[..., None], float("-inf")).amax(dim=1)
    return pooled - copy_to_tp(sharded_log_normalizer(pooled))[:, None]


def pooled_distribution_ce_sum(
    label_logits: torch.Tensor, label_mask: torch.Tensor, rationale_logits: torch.Tensor, rationale_mask: torch.Tensor
) -> torch.Tensor:
    """Our `pooled_distribution_ce` estimator of the MI term (formerly `pooled_ce`), summed over
    examples: the cross-entropy -sum_v P(v) log Q(v) of the rationale pass's pooled DISTRIBUTION Q
    against the label pass's P (pooled_log_distribution of each), P detached (the label task is the
    target, trained by its own CE). Not the authors' number (authors_mi_sum): Q is a distribution, so
    the term pushes the rationale pass's probability down on every token P does not favour.

    label_logits [B, Wl, vocab/tp], rationale_logits [B, Wr, vocab/tp]: this rank's vocabulary shard
    at the response positions of each example (padded; masks [B, Wl] / [B, Wr] say which are real).
    An example without a real position in either pass contributes 0. Returns a replicated scalar."""
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


def authors_pooled_probabilities(logits_local: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The authors' pooled prediction (model_utils.py:64-68): the softmax over the whole vocabulary at
    each position, then the max over positions of each vocabulary entry's probability, [B, W,
    vocab/tp] -> [B, vocab/tp] (this rank's shard: both steps are per vocabulary entry once the
    softmax's normaliser is all-reduced). Every position enters (the authors' padding included) unless
    `mask` [B, W] says which do; a masked position holds probability 0, which never wins a max over a
    real one."""
    probs = sharded_log_softmax(logits_local.float()).exp()
    if mask is not None:
        probs = probs.masked_fill(~mask.bool()[..., None], 0.0)
    return probs.max(dim=1).values


def authors_mi_sum(
    label_logits: torch.Tensor,
    rationale_logits: torch.Tensor,
    label_mask: Optional[torch.Tensor] = None,
    rationale_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The authors' MI term (xinchen9/cot_distillation_ACL2024 model_utils.py:61-73), summed over
    examples: nn.CrossEntropyLoss()(expl_prob_1, pred_prob_1) with the pooled probabilities of the
    rationale pass (authors_pooled_probabilities) used as LOGITS against the detached pooled
    probabilities of the label pass as a soft target (which sums to >= 1, not a distribution):
    -sum_v t(v) log_softmax(q)(v), the log-softmax over the whole vocabulary from the shards.

    label_logits [B, Wl, vocab/tp], rationale_logits [B, Wr, vocab/tp]: each example's window of
    response positions, its padding included as the authors' T5 decoder saw it (masks None), or only
    its real positions (masks [B, W]; --mi_mask_padding True); an example with no real position in a
    pass then contributes 0. Returns a replicated scalar (the authors' 'mean' is our sum / questions)."""
    with torch.no_grad():
        target = authors_pooled_probabilities(label_logits.detach(), label_mask)
    pooled = authors_pooled_probabilities(rationale_logits, rationale_mask)
    per_example = reduce_from_tp(-(target * sharded_log_softmax(pooled)).sum(dim=-1))
    if label_mask is None or rationale_mask is None:
        return per_example.sum()
    valid = label_mask.bool().any(1) & rationale_mask.bool().any(1)
    return (per_example * valid).sum()


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


MI_ESTIMATORS = ("pooled_distribution_ce", "authors", "critic")
MI_ALIASES = {"pooled_ce": "pooled_distribution_ce"}  # its name until the authors' term was added


def mi_estimator_name(name: str) -> str:
    """The estimator a --mi_estimator value names (an alias read as its estimator)."""
    return MI_ALIASES.get(name, name)


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


def window_width(labels: torch.Tensor) -> int:
    """The columns a batch needs for every row to hold its authors' window (response_window)."""
    keep = labels != IGNORE
    width = max(1, int(keep.sum(1).max()))
    return max(_first_labelled(keep[b]) for b in range(len(labels))) + width


def _first_labelled(keep_row: torch.Tensor) -> int:
    pos = keep_row.nonzero()
    return int(pos[0]) if len(pos) else 0


def response_window(labels: torch.Tensor, device):
    """(rows [B, W], positions [B, W], real [B, W]) of the authors' layout: as HF's T5 collator pads
    each pass of a micro-batch to its longest target, row b's window is W = the most labelled
    positions of any row, from its first labelled position on; the positions past its own labels
    are its padding (pad inputs after its response, as the T5 decoder ran on pad inputs), and `real`
    marks the others. The batch must be window_width(labels) columns wide (pad it)."""
    keep = labels != IGNORE
    counts = keep.sum(1)
    width = max(1, int(counts.max()))
    first = torch.tensor([_first_labelled(keep[b]) for b in range(len(labels))])
    cols = first[:, None] + torch.arange(width)[None, :]
    if int(cols.max()) >= labels.shape[1]:
        raise ValueError(f"the batch is {labels.shape[1]} columns wide; the window needs {int(cols.max()) + 1}")
    rows = torch.arange(len(labels))[:, None].expand_as(cols)
    real = torch.arange(width)[None, :] < counts[:, None]
    return tuple(to_device(x.contiguous(), device) for x in (rows, cols, real))


def widen(inputs: torch.Tensor, labels: torch.Tensor, width: int, pad_id: int):
    """A right-padded batch [B, T] widened to `width` columns of padding (labels IGNORE there): more
    pad positions after every row, which change nothing before them (causal attention)."""
    extra = width - inputs.shape[1]
    if extra <= 0:
        return inputs, labels
    return F.pad(inputs, (0, extra), value=pad_id), F.pad(labels, (0, extra), value=IGNORE)
