"""Large-batch generation with a preallocated KV cache and continuous batching.

A fixed number of slots (rows of the KV cache) decode together, one token per step. A slot whose
sequence finishes is refilled with the next waiting prompt (prefilled into that row alone), so a
large offline job never pays for padding to its longest output. Every row decodes from its own
position, so a prompt gives the same tokens in a batch as alone. Sampling draws from a generator
per request seeded by (seed, request), so results do not depend on which slot or batch a request
lands in. All tensor-parallel ranks run the same loop on the same gathered logits and the same
generators, so they pick the same tokens; only the caller decides who writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterator, List, Optional, Sequence

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0


@dataclass
class Request:
    key: Hashable
    prompt: List[int]
    seed: int = 0  # per-request sampling seed


@dataclass
class Completion:
    key: Hashable
    tokens: List[int]  # new tokens; a stop id, when reached, is the last one
    finish: str  # "stop" (stop id or stop string) or "length"


def request_seed(seed: int, *parts) -> int:
    import zlib

    return zlib.crc32(repr((seed,) + parts).encode()) & 0x7FFFFFFF


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """[n, V] logits -> [n] token ids: greedy, or temperature / top-k / top-p sampling with one
    uniform draw per row from that row's own generator (inverse-CDF over the sorted distribution)."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if params.top_k:
        sorted_probs[:, params.top_k:] = 0.0
    if params.top_p < 1.0:  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= params.top_p, 0.0)
    cdf = sorted_probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf.device, cdf.dtype)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
    return order.gather(-1, pick).squeeze(-1)


class StopStrings:
    """Detects stop strings in the decoded tail of a sequence (decoding only a few tokens per step)."""

    def __init__(self, tokenizer, strings: Sequence[str]):
        self.tok, self.strings = tokenizer, [s for s in strings if s]
        self.window = max((len(tokenizer.encode(s, bos=False)) for s in self.strings), default=0) + 4

    def __bool__(self):
        return bool(self.strings)

    def hit(self, tokens: List[int]) -> bool:
        tail = self.tok.decode(tokens[-self.window:])
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> str:
        ends = [text.find(s) for s in self.strings if s in text]
        return text[: min(ends)] if ends else text


class _Slots:
    """Host-side state of the decoding rows."""

    def __init__(self, n: int, device):
        self.req: List[Optional[Request]] = [None] * n
        self.out: List[List[int]] = [[] for _ in range(n)]
        self.gen: List[Optional[torch.Generator]] = [None] * n
        self.pos = torch.zeros(n, dtype=torch.long, device=device)  # position of the token fed next
        self.last = torch.zeros(n, dtype=torch.long, device=device)  # the token fed next

    def active(self) -> List[int]:
        return [i for i, r in enumerate(self.req) if r is not None]

    def free(self) -> List[int]:
        return [i for i, r in enumerate(self.req) if r is None]

    def keep(self, rows: List[int]) -> None:
        self.req = [self.req[i] for i in rows]
        self.out = [self.out[i] for i in rows]
        self.gen = [self.gen[i] for i in rows]
        idx = torch.tensor(rows, device=self.pos.device)
        self.pos, self.last = self.pos[idx], self.last[idx]


@torch.no_grad()
def generate_stream(model, requests: Sequence[Request], params: SamplingParams, batch_size: int,
                    stop_ids: Sequence[int] = (), stop_strings: Optional[StopStrings] = None,
                    prefill_tokens: int = 16384, refill_min: Optional[int] = None) -> Iterator[Completion]:
    """Yield a Completion per request, in completion order (continuous batching).

    batch_size: decoding slots. prefill_tokens: token budget of one prefill forward (more prompts
    are prefilled in several passes). refill_min: refill free slots once at least this many are free
    (default batch_size / 8), so prefills run in groups rather than one prompt at a time."""
    if not requests:
        return
    device = model.head_weight.device
    budget = params.max_new_tokens
    longest = max(len(r.prompt) for r in requests)
    max_len = min(longest + budget, model.args.max_seq_len)
    if longest >= max_len:
        raise ValueError(f"a prompt of {longest} tokens leaves no room under max_seq_len={model.args.max_seq_len}")
    n_slots = max(1, min(batch_size, len(requests)))
    refill_min = max(1, refill_min or n_slots // 8)
    queue = sorted(requests, key=lambda r: len(r.prompt))  # pop() takes the longest first
    cache = model.new_cache(n_slots, max_len)
    slots = _Slots(n_slots, device)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)

    def accept(rows: List[int], chosen: torch.Tensor) -> Iterator[Completion]:
        """Append each row's chosen token; finish the rows that stop."""
        hit_stop = torch.isin(chosen, stop).tolist()
        for row, token, is_stop in zip(rows, chosen.tolist(), hit_stop):
            out = slots.out[row]
            out.append(token)
            finish = None
            if is_stop or (stop_strings and stop_strings.hit(out)):
                finish = "stop"
            elif len(out) >= budget or int(slots.pos[row]) + 2 >= max_len:  # the next token would not fit
                finish = "length"
            if finish:
                yield Completion(slots.req[row].key, out, finish)
                slots.req[row], slots.out[row], slots.gen[row] = None, [], None
        slots.last[rows] = chosen
        slots.pos[rows] += 1

    def prefill(rows: List[int], reqs: List[Request]) -> Iterator[Completion]:
        start = 0
        while start < len(reqs):  # split by the prefill token budget
            width = len(reqs[start].prompt)
            end = start + max(1, min(len(reqs) - start, prefill_tokens // max(width, 1)))
            group, group_rows = reqs[start:end], rows[start:end]
            width = max(len(r.prompt) for r in group)
            tokens = torch.zeros(len(group), width, dtype=torch.long)
            for b, r in enumerate(group):
                tokens[b, : len(r.prompt)] = torch.tensor(r.prompt)
            lens = torch.tensor([len(r.prompt) for r in group], device=device)
            idx = torch.tensor(group_rows, device=device)
            hidden = model.forward_hidden(tokens.to(device), cache=cache, cache_rows=idx)
            logits = model.logits(hidden[torch.arange(len(group), device=device), lens - 1])
            for row, r in zip(group_rows, group):
                slots.req[row], slots.out[row] = r, []
                slots.gen[row] = torch.Generator().manual_seed(r.seed)
            slots.pos[idx] = lens - 1  # accept() advances to the first new token's position
            yield from accept(group_rows, choose_tokens(logits, params, [slots.gen[i] for i in group_rows]))
            start = end

    while queue or slots.active():
        free = slots.free()
        if queue and free and (len(free) >= min(refill_min, len(queue)) or not slots.active()):
            take = [queue.pop() for _ in range(min(len(free), len(queue)))]
            yield from prefill(free[: len(take)], take)
            continue
        active = slots.active()
        if not active:
            continue
        if not queue and len(active) <= len(slots.req) // 2:  # the tail: drop idle rows from the cache
            slots.keep(active)
            idx = torch.tensor(active, device=device)
            cache.k = [k[idx] for k in cache.k]
            cache.v = [v[idx] for v in cache.v]
            active = list(range(len(active)))
        idle = torch.tensor([r is None for r in slots.req], device=device)
        pos = slots.pos.masked_fill(idle, 0)  # idle rows write harmless garbage at their own slot 0
        kv_len = int(pos.max()) + 1
        logits = model(slots.last.masked_fill(idle, 0)[:, None], positions=pos[:, None], cache=cache,
                       kv_len=kv_len)[:, -1]
        rows = torch.tensor(active, device=device)
        yield from accept(active, choose_tokens(logits[rows], params, [slots.gen[i] for i in active]))


def fit_prompt(ids: List[int], limit: int, bos_id: Optional[int]) -> List[int]:
    """Cut a prompt from the left to at most `limit` tokens, keeping a leading BOS."""
    if len(ids) <= limit:
        return ids
    head = ids[:1] if bos_id is not None and ids[:1] == [bos_id] else []
    return head + ids[len(ids) - (limit - len(head)):]


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, stop_ids: Sequence[int] = (),
             batch_size: Optional[int] = None) -> List[List[int]]:
    """New token ids for each prompt, in prompt order (a stop id, when reached, is kept last)."""
    reqs = [Request(i, list(p), request_seed(params.seed, i)) for i, p in enumerate(prompts)]
    out: List[List[int]] = [[] for _ in prompts]
    for c in generate_stream(model, reqs, params, batch_size or len(prompts), stop_ids):
        out[c.key] = c.tokens
    return out
