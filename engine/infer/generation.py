"""Large-batch generation with a preallocated KV cache, continuous batching and a decode step that
runs on the device from one host synchronisation to the next.

A fixed number of slots (rows of the KV cache) decode together, one token per step. A slot whose
sequence finishes is refilled with the next waiting prompt (prefilled into that row alone), so a
large offline job never pays for padding to its longest output. Every row decodes from its own
position, so a prompt gives the same tokens in a batch as alone.

What lives where:
- On the device (`_DeviceSlots`): each slot's next token, its position, whether it is live, its
  request's seed and how many random draws it has used. A decode step reads and updates them in
  place and samples on the device, so it needs nothing from the host.
- On the host (`_HostSlots`): the request in each slot, its tokens so far, its prompt length. The
  host knows every live row's position without asking (one token per step), so it picks the step's
  shape (how many rows, how much of the cache to read) itself.
- Every `sync_every` steps the host reads back the tokens chosen since the last read (one copy),
  applies stop ids, stop strings and length limits exactly as if it had looked after every step
  (a row that stopped early decoded a few throw-away tokens meanwhile), frees finished rows and
  refills them. `Batcher` is that loop, one named step per part (drain, refill / prefill, compact,
  decode_block); `generate_stream` sizes it for a call.
- A prompt several requests hold (the --num_samples rows of a record) is prefilled once into a row
  of a shared prompt segment of the cache (`_PromptRows` on the host, models.transformer.KVCache on
  the device); the rows sampling it read it there and keep only their new tokens.

Sampling uses a counter-based generator: the u of draw j of a request is a hash of (its seed, j),
so results do not depend on which slot or batch a request lands in, nor on the device. All
tensor-parallel ranks run the same loop on the same gathered logits, so they pick the same tokens;
only the caller decides who writes.

Step runners (`make_runner`) decide how a step executes: `EagerSteps` (plain PyTorch, exact
shapes; CPU and `--compile False`), `StaticSteps` (a few fixed shapes, dense MoE routing: what a
CUDA graph can capture) and `CUDAGraphSteps` (those shapes captured once each and replayed).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Hashable, Iterator, List, Optional, Sequence

import torch

from models.compiled import CompiledCall, say_once
from models.vocab_parallel import ranking_key


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    top_p_bound: int = 0  # top_p among this many most likely tokens (torch.topk, no full sort); 0: the vocabulary
    seed: int = 0
    vocab_size: int = 0  # the tokenizer's: ids at or above it (a padded vocabulary's rows) are never chosen; 0: all


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
    return zlib.crc32(repr((seed,) + parts).encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------
# Sampling on the device
# ----------------------------------------------------------------------------------------------
def _int64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # logical shift of int64 bits


def uniform(seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """A uniform [0, 1) float per row from (seed, draw index) alone: splitmix64 in int64 tensor
    arithmetic (wrapping multiplication), so it runs inside a captured step and gives the same
    numbers on any device and in any batch."""
    z = seeds * (1 << 32) + draws + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).float() / float(1 << 24)


def most_likely(probs: torch.Tensor, k: int) -> tuple:
    """The k most likely tokens of each row [n, V] of float32 probabilities, (their probabilities, ids)
    [n, k], in the order of a stable descending sort (equal probabilities by token id): torch.topk
    of ranking_key, as torch.topk alone orders and picks among equal values as it likes."""
    vocab = probs.shape[-1]
    key = ranking_key(probs, torch.arange(vocab, device=probs.device), vocab, non_negative=True)
    order = key.topk(k, dim=-1).indices
    return probs.gather(-1, order), order


def choose_tokens(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, draws: torch.Tensor,
                  short: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[n, V] logits -> [n] token ids on the device: greedy, or temperature / top-k / top-p sampling
    by inverse CDF over the sorted distribution (probability descending, equal ones by token id) with
    one uniform per row from (seed, draw). With top_k only the k most likely tokens are taken
    (most_likely), never the whole vocabulary sorted: the draw is the one over the sorted vocabulary
    with the rest zeroed. top_p alone sorts the vocabulary (how much of it the nucleus needs is known
    only from the probabilities), unless top_p_bound: then the nucleus is taken among that many most
    likely tokens, the draw of the full sort wherever they hold top_p of the mass; `short` ([n] bool,
    written) says where they did not (there the nucleus was cut to them)."""
    if 0 < params.vocab_size < logits.shape[-1]:  # padding ids have no text: the tokenizer cannot decode them
        logits = logits[:, :params.vocab_size]
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    bound = params.top_k or (params.top_p_bound if params.top_p < 1.0 else 0)
    if bound:
        sorted_probs, order = most_likely(probs, min(bound, probs.shape[-1]))
    else:  # stable: equal probabilities (common with bf16 logits) in token order, as most_likely ranks them
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    if params.top_p < 1.0:  # keep the smallest prefix whose mass reaches top_p
        mass = sorted_probs.cumsum(-1)
        if short is not None:
            short.copy_(mass[:, -1] < params.top_p)
        sorted_probs = sorted_probs.masked_fill(mass - sorted_probs >= params.top_p, 0.0)
    cdf = sorted_probs.cumsum(-1)
    u = uniform(seeds, draws).to(cdf.dtype)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
    return order.gather(-1, pick).squeeze(-1)


class StopStrings:
    """Detects stop strings in the decoded tail of a sequence (decoding only a few tokens per step),
    and only after a token that could end one (`could_end`)."""

    def __init__(self, tokenizer, strings: Sequence[str]):
        self.tok, self.strings = tokenizer, [s for s in strings if s]
        self.window = max((len(tokenizer.encode(s, bos=False)) for s in self.strings), default=0) + 4
        self.last_chars = {s[-1] for s in self.strings}
        anchor = tokenizer.encode("a", bos=False)
        self._anchor, self._anchor_text = anchor, tokenizer.decode(anchor)
        self._ends: dict = {}  # token id -> could_end, filled as tokens come

    def __bool__(self):
        return bool(self.strings)

    def could_end(self, token: int) -> bool:
        """Whether a sequence ending in `token` can hold a stop string it did not hold one token before:
        the text the token adds after another (decoded after a plain anchor token, so a leading space
        counts) holds the last character of a stop string, or is not plain text (empty, a byte of a
        character, a special token: then it is looked at)."""
        known = self._ends.get(token)
        if known is None:
            text = self.tok.decode(self._anchor + [token])
            added = text[len(self._anchor_text):] if text.startswith(self._anchor_text) else ""
            known = not added or "\ufffd" in added or any(c in added for c in self.last_chars)
            self._ends[token] = known
        return known

    def hit(self, tokens: List[int]) -> bool:
        tail = self.tok.decode(tokens[-self.window:])
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> str:
        ends = [text.find(s) for s in self.strings if s in text]
        return text[: min(ends)] if ends else text


# ----------------------------------------------------------------------------------------------
# Slot state
# ----------------------------------------------------------------------------------------------
class _DeviceSlots:
    """Per-slot decode state on the device, updated in place by the decode step.

    The tokens chosen by the steps of one block go into `ring` [steps per block, n] at row
    `ring_at` (a device counter the step advances), so a step needs no copy of its tokens outside
    it: a captured step writes them itself, and the block's tokens are read back in one copy."""

    def __init__(self, n: int, device, ring: int = 1):
        def zeros():
            return torch.zeros(n, dtype=torch.long, device=device)

        self.tokens, self.pos, self.live, self.seeds, self.draws = (zeros() for _ in range(5))
        self.all = (self.tokens, self.pos, self.live, self.seeds, self.draws)
        self.ring = torch.zeros(ring, n, dtype=torch.long, device=device)
        self.ring_at = torch.zeros(1, dtype=torch.long, device=device)
        self.short = torch.zeros(n, dtype=torch.bool, device=device)  # see choose_tokens

    def start(self, rows: torch.Tensor, first: torch.Tensor, prompt_lens: torch.Tensor, seeds: torch.Tensor) -> None:
        """Rows just prefilled: `first` (drawn with draw 0) is fed next, at position len(prompt)."""
        self.tokens[rows], self.pos[rows], self.seeds[rows] = first, prompt_lens, seeds
        self.live[rows], self.draws[rows] = 1, 1

    def stop(self, rows: torch.Tensor) -> None:
        """Idle rows decode a harmless token at their own slot 0 until they are refilled."""
        self.live[rows], self.pos[rows] = 0, 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        n = rows.numel()
        for t in self.all:
            t[:n] = t.index_select(0, rows)
            t[n:] = 0

    def advance(self, m: int, chosen: torch.Tensor, max_len: int, short: Optional[torch.Tensor] = None) -> None:
        """The step's tokens into the ring (as cut_mark marks them where `short`) and the rows' state."""
        live = self.live[:m]
        self.ring[:, :m].index_copy_(0, self.ring_at, (chosen if short is None else cut_mark(chosen, short))[None])
        self.ring_at.add_(1)
        self.tokens[:m].copy_(chosen)
        self.pos[:m].copy_(torch.clamp(self.pos[:m] + live, max=max_len - 1))
        self.draws[:m].add_(live)


class _HostSlots:
    """What the host knows of each slot: its request, tokens read back so far, how many tokens it
    has produced on the device (read back or not) and the row of the shared prompt segment it reads."""

    def __init__(self, n: int):
        self.req: List[Optional[Request]] = [None] * n
        self.out: List[List[int]] = [[] for _ in range(n)]
        self.produced = [0] * n
        self.done = [False] * n  # finished by a token read back; freed at the next sync
        self.entry: List[Optional[int]] = [None] * n

    def live(self, m: int) -> List[int]:
        return [i for i in range(m) if self.req[i] is not None]

    def keep(self, rows: List[int]) -> None:
        """Move `rows` to the front (as the device state and the cache do); the rest become free."""
        free = len(self.req) - len(rows)
        self.req = [self.req[i] for i in rows] + [None] * free
        self.out = [self.out[i] for i in rows] + [[] for _ in range(free)]
        self.produced = [self.produced[i] for i in rows] + [0] * free
        self.done = [self.done[i] for i in rows] + [False] * free
        self.entry = [self.entry[i] for i in rows] + [None] * free


class _PromptRows:
    """The rows of a shared prompt segment (KVCache.prompts): which prompt each holds, how many
    decoding rows read it, and its last position's logits (a row that joins a prompt prefilled
    earlier draws its first token from them)."""

    def __init__(self, n: int):
        self.free = list(range(n - 1, -1, -1))  # pop() takes the lowest
        self.of: dict = {}  # prompt tuple -> row
        self.users = [0] * n
        self.logits: Optional[torch.Tensor] = None  # [n, V], allocated at the first prefill

    def release(self, row: int, prompt: tuple) -> None:
        self.users[row] -= 1
        if not self.users[row]:
            del self.of[prompt]
            self.free.append(row)


def prompt_layout(requests: Sequence[Request], slots: int) -> Optional[tuple]:
    """(rows, length) of a shared prompt segment for `requests` decoded in `slots` rows, or None
    when prompts repeat fewer than twice on average. A prompt's row is kept until the last of its
    samples finishes, so the segment has twice the rows the slots fill at K samples a prompt on
    average (refills wait for a free one; with the maximum instead, a few repeated prompts among
    many single ones would leave most slots waiting)."""
    prompts = {tuple(r.prompt) for r in requests}
    per_prompt = len(requests) / max(len(prompts), 1)
    if per_prompt < 2:
        return None
    return min(slots, len(prompts), 2 * math.ceil(slots / per_prompt)), max(len(r.prompt) for r in requests)


def _prefill_logits(model, tokens: torch.Tensor, cache, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Prompts [g, width] into cache rows `rows` from position 0; the logits [g, V] at each prompt's
    last position `last` (what a compiled prefill runs, one graph for every width)."""
    hidden = model.forward_hidden(tokens, cache=cache, cache_rows=rows)
    return model.logits(hidden[torch.arange(tokens.shape[0], device=tokens.device), last])


def bounds_nucleus(params: SamplingParams) -> bool:
    """Whether top_p_bound applies: sampling with top_p and without top_k."""
    return params.temperature > 0 and params.top_p < 1.0 and not params.top_k and params.top_p_bound > 0


def cut_mark(tokens: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
    """Tokens on their way to the host, -1 - token where the bound cut their draw's nucleus (the host
    counts the tokens it keeps that were: no other copy, no other sync)."""
    return torch.where(short, -1 - tokens, tokens)


def _decode_step(model, cache, state: _DeviceSlots, params: SamplingParams, m: int, kv_len: int, max_len: int):
    """One token for each of the first m slots, everything on the device: what a CUDA graph captures."""
    logits = model(state.tokens[:m, None], positions=state.pos[:m, None], cache=cache, kv_len=kv_len)[:, -1]
    short = state.short[:m] if bounds_nucleus(params) else None
    state.advance(m, choose_tokens(logits, params, state.seeds[:m], state.draws[:m], short), max_len, short)


# ----------------------------------------------------------------------------------------------
# How a step executes
# ----------------------------------------------------------------------------------------------
class EagerSteps:
    """Plain PyTorch at exact shapes: the KV length each step needs, the live rows only.

    A runner owns the KV cache and slot state of its generation calls: a call with the same slot
    count, cache length and sampling parameters as the last reuses them (and, for CUDA graphs, the
    graphs captured on them)."""

    sync_every = 1
    overlap = False  # queue the next block before reading the last (Batcher)
    description = "eager decode step"
    step_call = None  # a CompiledCall of _decode_step when the step is compiled
    prefill_call = None  # and one of _prefill_logits (dynamic shapes) with it

    def __init__(self, model):
        self.model, self._key, self.cache, self.state = model, None, None, None

    def buffers(self, n: int, max_len: int, params: SamplingParams, prompts: Optional[tuple] = None):
        """The KV cache (n rows of max_len slots; prompts: (rows, length) of a shared prompt segment)
        and the slot state of a call."""
        key = (n, max_len, prompts, params.temperature, params.top_p, params.top_k, params.top_p_bound,
               params.vocab_size)
        if key != self._key:
            self.cache = self.state = None  # free the old ones first
            self.forget()
            self.cache = self.model.new_cache(n, max_len, prompts=prompts)
            self.state, self._key = _DeviceSlots(n, self.model.head_weight.device, self.sync_every), key
        else:
            shared = (self.cache.prompt_of, self.cache.prompt_len) if prompts else ()
            for t in self.state.all + (self.state.ring, self.state.ring_at) + shared:
                t.zero_()
        return self.cache, self.state

    def forget(self) -> None:
        """Drop what was built on the old buffers."""

    def rows_for(self, count: int, n: int) -> int:
        return count

    def kv_len(self, need: int, max_len: int) -> int:
        return need

    def run(self, step, m: int, kv_len: int) -> None:
        step(m, kv_len)


class StaticSteps(EagerSteps):
    """A few fixed shapes: row counts n, n/2, n/4 ...; KV lengths 64, 128, ... 1024, then multiples
    of 1024 (short sequences do not read the whole cache); MoE routed without a host sync. On
    CPU this runs the step a CUDA graph captures, uncaptured (compiled: through torch.compile)."""

    description = "static-shape decode step"

    def __init__(self, model, sync_every: int = 8, first_bucket: int = 64, compiled: bool = False,
                 overlap: bool = True, **compile_options):
        super().__init__(model)
        self.sync_every, self.first_bucket, self.overlap = sync_every, first_bucket, overlap
        if compiled:
            self.step_call = CompiledCall(_decode_step, "decode step", **compile_options)
            # prompts come in every width: one dynamic-shape graph (not captured; its kernels fused)
            self.prefill_call = CompiledCall(_prefill_logits, "prefill", dynamic=True,
                                             backend=compile_options.get("backend", "inductor"))

    def rows_for(self, count: int, n: int) -> int:
        level = n
        while level > 1 and (level + 1) // 2 >= count:
            level = (level + 1) // 2
        return level

    def kv_len(self, need: int, max_len: int) -> int:
        bucket = self.first_bucket
        while bucket < need:
            bucket = bucket * 2 if bucket < 1024 else bucket + 1024
        return min(bucket, max_len)

    def run(self, step, m: int, kv_len: int) -> None:
        with self.model.static_shapes():
            step(m, kv_len)


class CUDAGraphSteps(StaticSteps):
    """Each (rows, KV length) shape is captured once in a CUDA graph and replayed after.

    Why torch.cuda.CUDAGraph directly rather than torch.compile(mode="reduce-overhead"): the state a
    step mutates (KV cache, slot tensors) is allocated once by the caller and updated in place, the
    tokens are copied out of a static buffer before the next replay, and a failed capture falls back
    to eager with one line; cudagraph trees would copy inputs and own outputs instead. The step is
    first run for real (which also warms up cuBLAS and, with `compiled`, builds the fused kernels of
    torch.compile, inductor without its own graphs), then captured. Under tensor parallelism the
    all-reduces are captured with the rest (NCCL). Constructing one touches no GPU (the graph memory
    pool is taken at the first capture)."""

    def __init__(self, model, sync_every: int = 8, first_bucket: int = 64, compiled: bool = True):
        super().__init__(model, sync_every, first_bucket, compiled, dynamic=None)
        self.graphs, self.pool, self.capture = {}, None, True
        self.description = "CUDA graphs of a " + ("torch.compile'd " if compiled else "") + "static-shape decode step"

    def forget(self) -> None:
        self.graphs.clear()

    def run(self, step, m: int, kv_len: int) -> None:
        graph = self.graphs.get((m, kv_len))
        if graph is not None:
            graph.replay()
            return
        with self.model.static_shapes():
            if not self.capture:
                step(m, kv_len)
                return
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the real step of this token, and the warm-up of the capture
                step(m, kv_len)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    step(m, kv_len)
            except Exception as e:  # a feature that cannot be captured: keep decoding eagerly
                self.capture = False
                say_once(f"decode: CUDA graph capture failed ({' '.join(str(e).split())[:200]}); "
                          f"continuing with the eager static-shape step")
                return
            self.graphs[(m, kv_len)] = graph


def make_runner(model, compiled: Optional[bool] = None):
    """The fastest step runner this device allows: CUDA graphs (over a torch.compile'd step) on a
    GPU, eager on CPU or with compiled=False."""
    device = model.head_weight.device
    if compiled is False:
        runner, why = EagerSteps(model), "--compile False"
    elif device.type != "cuda":
        runner, why = EagerSteps(model), "CUDA graphs need a GPU"
    else:
        runner, why = CUDAGraphSteps(model), None
    say_once(f"decode: {runner.description}" + (f" ({why})" if why else ""))
    return runner


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class _Readback:
    """Tokens chosen on the device, on their way to the host: (rows, the request each row held when
    they were chosen, count) per group, and one copy of them all, started as soon as the block that
    chose them is queued (on a GPU non-blocking into pinned memory, waited for by an event), so the
    host can read it while the next block runs."""

    def __init__(self, groups: list):
        """groups: (rows, requests, tokens) with tokens [len(rows)] (a prefill's first tokens) or
        [steps, len(rows)] (a decode block's, step by step)."""
        self.groups = [(rows, reqs, len(rows)) for rows, reqs, t in groups for _ in range(t.shape[0] if t.dim() == 2 else 1)]
        values = torch.cat([t.reshape(-1) for _, _, t in groups])
        self.event = None
        if values.device.type == "cuda":
            values, self.event = values.to("cpu", non_blocking=True), torch.cuda.Event()
            self.event.record()
        self.values = values

    def read(self) -> List[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.values.tolist()


class Batcher:
    """One generate_stream call: `n` slots decoding together over a KV cache of max_len positions.

    A round (`run`) reads back the tokens chosen since the last one and finishes the rows that stop
    (`drain`), prefills waiting prompts into free slots (`refill`), moves the live rows to the front
    of the cache once nothing waits and half the rows are idle (`compact`), and decodes up to
    runner.sync_every steps without looking at the tokens (`decode_block`). With `overlap` (the
    runner's; the static-shape runners) the next block is queued before the last one is read, so the
    device decodes while the host applies stops: a row that stopped in the block read decodes one
    more block of throw-away tokens, and a free row is refilled one block later; the tokens of every
    request are the same either way (each read-back token is kept only for the request its row held
    when it was chosen)."""

    def __init__(self, model, runner, params: SamplingParams, n: int, max_len: int, stop_ids: Sequence[int] = (),
                 stop_strings: Optional[StopStrings] = None, prefill_tokens: int = 16384, refill_min: int = 1,
                 share_prompts: bool = True):
        self.model, self.runner, self.params, self.n, self.max_len = model, runner, params, n, max_len
        self.share_prompts, self.prefilled = share_prompts, 0  # prompt tokens run through a prefill forward
        self.cut = 0  # tokens kept whose draw's nucleus top_p_bound cut
        self.stops, self.stop_strings = set(stop_ids), stop_strings
        self.prefill_tokens, self.refill_min = prefill_tokens, refill_min
        self.overlap = runner.overlap
        self.device = model.head_weight.device
        self.cache = self.state = self.prompts = None  # allocated by run(), which knows the prompts
        self.host = _HostSlots(n)
        self.chosen = []  # (rows, requests, tokens tensor) queued since the last _Readback
        self.pending: List[_Readback] = []  # not read by the host yet, oldest first
        self.m = n  # slots in use: rows [0, m) of the cache

    def run(self, requests: Sequence[Request]) -> Iterator[Completion]:
        """A Completion per request, in completion order."""
        layout = prompt_layout(requests, self.n) if self.share_prompts else None
        # with a shared prompt segment a row's own slots hold its new tokens only
        own = self.max_len if layout is None else min(self.params.max_new_tokens, self.max_len)
        if layout is not None:  # as wide as max_len leaves a prompt: a caller that fixes max_len (the
            # on-policy sampler, call after call) keeps the runner's buffers and captured graphs
            layout = (layout[0], max(layout[1], self.max_len - own))
        self.cache, self.state = self.runner.buffers(self.n, own, self.params, layout)
        self.prompts = None if layout is None else _PromptRows(layout[0])
        queue = sorted(requests, key=lambda r: len(r.prompt))  # pop() takes the longest first
        live: List[int] = []
        while True:
            ahead = self.overlap and live and not all(self.length_done(r, self.host.produced[r]) for r in live)
            if ahead:  # the next block is queued before the host reads the last one
                self.decode_block(live)
            yield from self.drain(keep=1 if ahead else 0)
            live = self.host.live(self.m)
            if not queue and not live:
                return
            live = self.refill(queue, live)
            if not queue and len(live) <= self.m // 2:  # the tail: keep the live rows at the front of the cache
                yield from self.drain()  # every token read before rows move
                live = self.host.live(self.m)
                if not live:
                    continue
                live = self.compact(live)
            if not self.overlap:
                self.decode_block(live)

    def length_done(self, row: int, produced: int) -> bool:
        return produced >= self.params.max_new_tokens or len(self.host.req[row].prompt) + produced >= self.max_len

    def drain(self, keep: int = 0) -> Iterator[Completion]:
        """Read back the tokens of every block but the last `keep` and finish the rows that stop."""
        ready, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        host, finished = self.host, []
        for readback in ready:
            values, start = readback.read(), 0
            for rows, reqs, count in readback.groups:
                chunk = values[start:start + count]
                start += count
                for row, req, token in zip(rows, reqs, chunk):
                    if req is None or host.req[row] is not req or host.done[row]:
                        continue
                    if token < 0:  # a draw whose nucleus top_p_bound cut (cut_mark)
                        token, self.cut = -1 - token, self.cut + 1
                    finish = self.finish_of(row, token)
                    if finish:
                        host.done[row] = True
                        finished.append(row)
                        yield Completion(req.key, host.out[row], finish)
        if finished:
            self.state.stop(torch.tensor(finished, device=self.device))
            for row in finished:
                if host.entry[row] is not None:
                    self.prompts.release(host.entry[row], tuple(host.req[row].prompt))
                host.req[row], host.out[row], host.produced[row], host.done[row] = None, [], 0, False
                host.entry[row] = None

    def finish_of(self, row: int, token: int) -> Optional[str]:
        """Append a read-back token to its row: "stop", "length" or None (the row goes on)."""
        out = self.host.out[row]
        out.append(token)
        if token in self.stops or (self.stop_strings and self.stop_strings.could_end(token)
                                   and self.stop_strings.hit(out)):
            return "stop"
        return "length" if self.length_done(row, len(out)) else None

    def read_back_later(self) -> None:
        """Start the copy of the tokens chosen since the last one (read by a later drain)."""
        if self.chosen:
            self.pending.append(_Readback(self.chosen))
            self.chosen = []

    def refill(self, queue: List[Request], live: List[int]) -> List[int]:
        """Prefill waiting prompts into the free slots, once enough are free (or nothing is live);
        returns the live rows. With a shared prompt segment a request waits while its prompt has no
        row there and none is free."""
        free = [i for i in range(self.m) if self.host.req[i] is None]
        if queue and free and (len(free) >= min(self.refill_min, len(queue)) or not live):
            take, new = [], set()
            while queue and len(take) < len(free):
                prompt = tuple(queue[-1].prompt)
                if self.prompts is not None and prompt not in self.prompts.of and prompt not in new:
                    if len(new) == len(self.prompts.free):
                        break
                    new.add(prompt)
                take.append(queue.pop())
            if not take and not live:  # every prompt row is free once nothing decodes
                raise RuntimeError("generation: no row of the shared prompt segment is free while no row decodes")
            if take:
                self.prefill(free[: len(take)], take)
                self.read_back_later()
                live = self.host.live(self.m)
        return live

    def prefill(self, rows: List[int], reqs: List[Request]) -> None:
        """Prompts into the KV cache, in groups within the prefill token budget; each row's first token
        is drawn (draw 0) and left for a later drain. Without a shared prompt segment each row's prompt
        is prefilled into that row. With one (KVCache.prompts: a prompt met several times, the
        --num_samples rows of a record) a prompt is prefilled once, into a row of the segment, and
        every row sampling it reads it there and draws its own first token from the same logits."""
        device, prompts = self.device, self.prompts
        if prompts is None:
            targets = rows  # where each prompt is prefilled
            unique = list(zip(rows, reqs))
        else:
            unique = []
            for r in reqs:
                key = tuple(r.prompt)
                if key not in prompts.of:
                    prompts.of[key] = prompts.free.pop()
                    unique.append((prompts.of[key], r))
            targets = [prompts.of[tuple(r.prompt)] for r in reqs]
        logits, start = [], 0
        while start < len(unique):  # split by the prefill token budget
            width = len(unique[start][1].prompt)
            end = start + max(1, min(len(unique) - start, self.prefill_tokens // max(width, 1)))
            logits.append(self.prefill_group(unique[start:end]))
            start = end
        if prompts is None:
            logits = torch.cat(logits)
        elif logits:  # the prompts new to the segment: their last position's logits kept for later rows
            new = torch.cat(logits)
            if prompts.logits is None:
                prompts.logits = new.new_zeros(len(prompts.users), new.shape[-1])
            prompts.logits[torch.tensor([e for e, _ in unique], device=device)] = new
        idx, lens = torch.tensor(rows, device=device), torch.tensor([len(r.prompt) for r in reqs], device=device)
        if prompts is not None:
            entries = torch.tensor(targets, device=device)
            logits = prompts.logits[entries]
            self.cache.prompt_of[idx], self.cache.prompt_len[idx] = entries, lens
        seeds = torch.tensor([r.seed for r in reqs], device=device)
        short = self.state.short[:len(rows)] if bounds_nucleus(self.params) else None
        first = choose_tokens(logits, self.params, seeds, torch.zeros_like(seeds), short)
        self.state.start(idx, first, lens, seeds)
        self.chosen.append((list(rows), list(reqs), first if short is None else cut_mark(first, short)))
        for row, target, r in zip(rows, targets, reqs):
            self.host.req[row], self.host.out[row], self.host.produced[row], self.host.done[row] = r, [], 1, False
            if prompts is not None:
                self.host.entry[row] = target
                prompts.users[target] += 1

    def prefill_group(self, group: list) -> torch.Tensor:
        """One prefill forward of the (cache row, request) pairs `group`: the logits [len(group), V] of
        each prompt's last position."""
        device = self.device
        width = max(len(r.prompt) for _, r in group)
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        for b, (_, r) in enumerate(group):
            tokens[b, : len(r.prompt)] = torch.tensor(r.prompt)
        lens = torch.tensor([len(r.prompt) for _, r in group], device=device)
        self.prefilled += sum(len(r.prompt) for _, r in group)
        cache = self.cache if self.prompts is None else self.cache.prompts
        return (self.runner.prefill_call or _prefill_logits)(
            self.model, tokens.to(device), cache, torch.tensor([row for row, _ in group], device=device), lens - 1)

    def compact(self, live: List[int]) -> List[int]:
        """Move the live rows to the front of the cache, device state and host slots, and decode only
        as many rows as the runner's shapes need from now on; returns the live rows (0, 1, ...).
        Every token chosen so far has been read back (drain) before."""
        idx = torch.tensor(live, device=self.device)
        self.cache.keep_rows(idx)
        self.state.keep_rows(idx)
        self.host.keep(live)
        self.m = self.runner.rows_for(len(live), self.n)
        return list(range(len(live)))

    def decode_block(self, live: List[int]) -> None:
        """Up to runner.sync_every decode steps of the first m rows, their tokens left for a later
        drain; stops early once every live row has reached its length limit."""
        host = self.host
        rows, reqs = list(range(self.m)), list(host.req[: self.m])
        self.state.ring_at.zero_()
        steps = 0
        for _ in range(self.runner.sync_every):
            if all(self.length_done(r, host.produced[r]) for r in live):
                break
            need = max(self.slot_of_next(r) for r in live) + 1
            self.runner.run(self.step, self.m, self.runner.kv_len(need, self.cache.max_len))
            steps += 1
            for r in live:
                host.produced[r] += 1
        if steps:  # copied out (read_back_later) before the next block writes the ring again
            self.chosen.append((rows, reqs, self.state.ring[:steps, : self.m]))
        self.read_back_later()

    def slot_of_next(self, row: int) -> int:
        """The cache slot of the token the next step feeds row `row` (the position of its last token
        produced; with a shared prompt segment, counted from the prompt's end)."""
        produced = self.host.produced[row]
        if self.prompts is not None:
            return min(produced - 1, self.cache.max_len - 1)
        return min(len(self.host.req[row].prompt) - 1 + produced, self.max_len - 1)

    def step(self, rows: int, kv_len: int) -> None:
        """One decode step of the first `rows` slots (what the runner runs, compiles or captures)."""
        (self.runner.step_call or _decode_step)(self.model, self.cache, self.state, self.params, rows, kv_len,
                                                self.max_len)


@torch.no_grad()
def generate_stream(model, requests: Sequence[Request], params: SamplingParams, batch_size: int,
                    stop_ids: Sequence[int] = (), stop_strings: Optional[StopStrings] = None,
                    prefill_tokens: int = 16384, refill_min: Optional[int] = None,
                    compiled: Optional[bool] = None, runner=None, share_prompts: bool = True,
                    stats: Optional[dict] = None) -> Iterator[Completion]:
    """Yield a Completion per request, in completion order (continuous batching).

    batch_size: decoding slots. prefill_tokens: token budget of one prefill forward (more prompts
    are prefilled in several passes). refill_min: refill free slots once at least this many are free
    (default batch_size / 8), so prefills run in groups rather than one prompt at a time.
    compiled: None picks the fastest path for the device (see make_runner); runner: an explicit one
    (pass the same runner to several calls of the same shape to reuse its buffers and graphs).
    share_prompts: a prompt several requests hold is prefilled once and its keys and values kept
    once, in a shared prompt segment of the cache (Batcher). stats: a dict that gets, once every
    request is done, "top_p_cut": the draws whose nucleus top_p_bound cut (with a bound)."""
    if not requests:
        return
    longest = max(len(r.prompt) for r in requests)
    max_len = min(longest + params.max_new_tokens, model.args.max_seq_len)
    if longest >= max_len:
        raise ValueError(f"a prompt of {longest} tokens leaves no room under max_seq_len={model.args.max_seq_len}")
    n = max(1, min(batch_size, len(requests)))
    runner = runner or make_runner(model, compiled)
    batcher = Batcher(model, runner, params, n, max_len, stop_ids, stop_strings, prefill_tokens,
                      max(1, refill_min or n // 8), share_prompts)
    yield from batcher.run(requests)
    if stats is not None and bounds_nucleus(params):
        stats["top_p_cut"] = batcher.cut


def complete_prompts(model, prompts: Sequence[Sequence[int]], params: SamplingParams, stop_ids: Sequence[int] = (),
                     batch_size: Optional[int] = None, compiled: Optional[bool] = None,
                     runner=None, share_prompts: bool = True) -> List[List[int]]:
    """New token ids for each prompt, in prompt order (a stop id, when reached, is kept last)."""
    reqs = [Request(i, list(p), request_seed(params.seed, i)) for i, p in enumerate(prompts)]
    out: List[List[int]] = [[] for _ in prompts]
    for c in generate_stream(model, reqs, params, batch_size or len(prompts), stop_ids, compiled=compiled,
                             runner=runner, share_prompts=share_prompts):
        out[c.key] = c.tokens
    return out
