"""Batched generation with a preallocated KV cache: prefill, then one token per step per row.

Rows hold prompts of different lengths; each row decodes from its own position, so a prompt gives
the same tokens in a batch as alone. Every tensor-parallel rank runs the same loop on the same
(gathered) logits and the same seeded generator, so all ranks pick the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0


def pick_next(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, V] logits -> [B] token ids (greedy, or temperature / top-k / top-p sampling)."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, stop_ids: Sequence[int] = ()) -> List[List[int]]:
    """Generate continuations for a batch of token-id prompts; returns the new ids of each row
    (a stop id, when reached, is kept as the last token)."""
    device = model.head_weight.device
    bsz = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    limit = min(int(lens.max()) + params.max_new_tokens, model.args.max_seq_len)
    if int(lens.max()) >= limit:
        raise ValueError(f"a prompt of {int(lens.max())} tokens leaves no room under max_seq_len={model.args.max_seq_len}")
    tokens = torch.zeros(bsz, int(lens.max()), dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    cache = model.new_cache(bsz, limit)
    hidden = model.forward_hidden(tokens.to(device), cache=cache)
    last = hidden[torch.arange(bsz), (lens - 1).to(device)]
    logits = model.logits(last)
    generator = torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    pos = lens.to(device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    out = []
    for _ in range(params.max_new_tokens):
        nxt = pick_next(logits, params, generator)
        out.append(torch.where(done, torch.full_like(nxt, -1), nxt))
        done = done | torch.isin(nxt, stop) | (pos + 1 >= limit)
        if bool(done.all()):
            break
        logits = model(nxt[:, None], positions=pos[:, None], cache=cache, kv_len=int(pos.max()) + 1)[:, -1]
        pos = pos + 1
    ids = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(bsz)]
    return [[t for t in row if t >= 0] for row in ids]
