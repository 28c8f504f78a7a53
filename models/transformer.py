"""ONE tensor-parallel decoder for LLaMA / Mistral / Qwen / Mixtral, built from fairscale's layers.

Family differences are ModelArgs values: GQA (n_kv_heads), RoPE base and scaling, q/k/v biases,
tied embeddings, sliding-window attention, and a mixture of experts in place of the dense MLP.

Tensor parallelism follows Meta's reference LLaMA: q/k/v, w1/w3 and the output head are
column-parallel; wo and w2 are row-parallel; the token embedding is split over the vocabulary.
When the tensor-parallel size exceeds n_kv_heads, each rank holds a copy of the one KV head its
query heads use (models/sharding.py says which weights those are, for the trainer's gradient sums).

RoPE uses the rotate-half convention (HF's); Meta's interleaved q/k rows are permuted at the
checkpoint boundary (engine/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from models import decode_kernels
from models.args import DECODE_ATTENTION, ModelArgs
from models.compiled import CompiledCall, say_once
from models.decode_kernels import fused_decode_attention
from models.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
)


def _keep(tensor):  # weights always come from a checkpoint: skip fairscale's random init
    return tensor


def _materialize(module: nn.Module, device, dtype) -> None:
    """Swap the CPU fp32 storage fairscale allocates for empty storage of the target device/dtype,
    one layer at a time, so building a 70B shard never holds an extra fp32 copy."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype),
                                                     requires_grad=p.requires_grad)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding:
    """cos/sin tables for given positions. A plain object, not a module: `module.to(dtype)` must never
    touch the inverse frequencies."""

    def __init__(self, args: ModelArgs):
        dim = args.head_dim
        inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = args.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        self.inv_freq = inv_freq
        self._device_copies = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype):
        inv = self._device_copies.get(positions.device)
        if inv is None:
            inv = self._device_copies[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x: [B, S, H, D]; cos/sin: [B, S, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Boolean [B, 1, S, T] mask: a query at position p sees keys at positions <= p (and > p - window).
    q_pos: [B, S]; k_pos: [B, T] or [T]."""
    if k_pos.dim() == 1:
        k_pos = k_pos.unsqueeze(0)
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask.unsqueeze(1)


class KVCache:
    """Preallocated keys/values of every layer: [rows, local kv heads, max_len, head_dim] each.

    Slot t of row r holds the key/value of that row's position t. A forward over B rows without
    `rows` uses the first B rows of the cache, so a decode loop that keeps its live rows at the
    front (see `keep_rows`) can run on a prefix of a cache allocated once: the tensors never move,
    which is what lets a captured decode step replay on them.

    With `prompts` (another KVCache, one row per prompt: the shared prompt segment) a row holds only
    what follows its prompt: row r reads positions [0, prompt_len[r]) from prompt row prompt_of[r]
    and keeps position p at its own slot p - prompt_len[r]. The K sampled rows of one prompt then
    keep one copy of its keys and values, not K (--num_samples)."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device, dtype, tp_size: int = None,
                 prompts: Optional["KVCache"] = None):
        tp = tp_size or get_model_parallel_world_size()
        shape = (batch_size, args.local_kv_heads(tp), max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.rows, self.max_len, self.prompts = batch_size, max_len, prompts
        if prompts is not None:  # row r continues prompt row prompt_of[r] of prompt_len[r] tokens (0: none)
            self.prompt_of = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.prompt_len = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._by_prompt, self._groups = False, None  # see grouped_by_prompt

    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.k + self.v)
        return own + (self.prompts.nbytes() if self.prompts is not None else 0)

    def slots(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The slots [B, S] of `positions` [B, S] in cache rows `rows` [B]."""
        if self.prompts is None:
            return positions
        return (positions - self.prompt_len[rows][:, None]).clamp(0, self.max_len - 1)

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rows: Optional[torch.Tensor] = None) -> None:
        """Store k/v [B, S, H, D] of input row b at (rows[b] or b, positions[b, s])."""
        if rows is None:
            rows = torch.arange(k.shape[0], device=k.device)
        ck, cv, slots = self.k[layer], self.v[layer], self.slots(positions, rows)
        ck[rows[:, None], :, slots] = k.to(ck.dtype)  # advanced indexing -> [B, S, H, D]
        cv[rows[:, None], :, slots] = v.to(cv.dtype)

    def read(self, layer: int, length: int, n_rows: int):
        """Keys and values [n_rows, H, length, D] of the first n_rows rows, slots [0, length); with
        `prompts`, each a pair of blocks: the whole prompt segment of each row's prompt [n_rows, H,
        width, D], then those slots (their positions: key_positions)."""
        k, v = self.k[layer][:n_rows, :, :length], self.v[layer][:n_rows, :, :length]
        if self.prompts is None:
            return k, v
        pk, pv = self.prompts.k[layer], self.prompts.v[layer]
        if not self._by_prompt:  # static shapes: each row's prompt block copied out for it
            rows = self.prompt_of[:n_rows]
            return (pk.index_select(0, rows), k), (pv.index_select(0, rows), v)
        if self._groups is None:  # once per forward (its layers read the same rows)
            self._groups = prompt_groups(self.prompt_of[:n_rows], pk.shape[0])
        used, group, rank, members = self._groups
        if used is not None:
            pk, pv = pk.index_select(0, used), pv.index_select(0, used)
        return (SharedPromptBlock(pk, group, rank, members), k), (SharedPromptBlock(pv, group, rank, members), v)

    @contextlib.contextmanager
    def grouped_by_prompt(self):
        """Within (one eager decode forward): `read` gives the prompt segment as one block per prompt
        row in use (SharedPromptBlock), which attention scores for all of that prompt's rows at once,
        instead of a copy of it per row; the grouping depends on the data (its size is read back),
        so not under static_shapes()."""
        self._by_prompt, self._groups = self.prompts is not None, None
        try:
            yield
        finally:
            self._by_prompt, self._groups = False, None

    def prompt_segment(self, layer: int) -> tuple:
        """(keys, values, prompt_of, prompt_len) of the shared prompt segment (the fused kernel's), or ()."""
        if self.prompts is None:
            return ()
        return self.prompts.k[layer], self.prompts.v[layer], self.prompt_of, self.prompt_len

    def key_positions(self, length: int, n_rows: int, device) -> torch.Tensor:
        """The position of each key `read` returns: [length], or [n_rows, T] with `prompts` (prompt
        slots past a row's prompt get a position no query reaches)."""
        if self.prompts is None:
            return torch.arange(length, device=device)
        return decode_kernels.segment_key_positions(self.prompt_len[:n_rows], self.prompts.max_len, length)

    @torch.no_grad()
    def keep_rows(self, rows: torch.Tensor) -> None:
        """Move `rows` (ascending) to the front, in place; the rows after them become free."""
        n = rows.numel()
        for t in self.k + self.v + ([self.prompt_of, self.prompt_len] if self.prompts is not None else []):
            t[:n] = t.index_select(0, rows)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        tp = get_model_parallel_world_size()
        self.layer_id = layer_id
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // tp
        self.n_local_kv_heads = args.local_kv_heads(tp)
        self.window = args.sliding_window
        kv_out = self.n_local_kv_heads * tp * args.head_dim  # replicated heads count once per rank
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias,
                                       gather_output=False, init_method=_keep)
        self.wk = ColumnParallelLinear(args.dim, kv_out, bias=args.qkv_bias, gather_output=False, init_method=_keep)
        self.wv = ColumnParallelLinear(args.dim, kv_out, bias=args.qkv_bias, gather_output=False, init_method=_keep)
        self.wo = RowParallelLinear(args.n_heads * args.head_dim, args.dim, bias=False, input_is_parallel=True,
                                    init_method=_keep)
        self.fused = None  # (weight, bias) of q/k/v in one matrix, see Transformer.fuse_projections
        self.decode_kind = "dense"  # how a decode step attends (Transformer.decode_attention)

    def heads(self, *qkv):
        """q, k, v [..., heads, head_dim] from the three projections, or from the fused one [..., q | k | v]."""
        if len(qkv) == 1:
            qkv = qkv[0].split([self.wq.weight.shape[0], self.wk.weight.shape[0], self.wv.weight.shape[0]], dim=-1)
        q, k, v = qkv
        return (q.unflatten(-1, (self.n_local_heads, self.head_dim)),
                k.unflatten(-1, (self.n_local_kv_heads, self.head_dim)),
                v.unflatten(-1, (self.n_local_kv_heads, self.head_dim)))

    def forward(self, x, cos, sin, positions, mask, cache: Optional[KVCache], kv_len: Optional[int],
                cache_rows: Optional[torch.Tensor] = None):
        bsz, seqlen, _ = x.shape
        if self.fused is not None:
            q, k, v = self.heads(F.linear(x, *self.fused))
        else:
            q, k, v = self.heads(self.wq(x), self.wk(x), self.wv(x))
        decoding = cache is not None and cache_rows is None and seqlen == 1
        kind = self.decode_kind if decoding else "dense"
        if kind == "ragged" and cache.prompts is not None:  # it reads one cache row per row: dense
            kind = "dense"
        if kind == "fused":  # RoPE, the cache write and attention in one operation
            out = fused_decode_attention(q[:, 0], k[:, 0], v[:, 0], cos[:, 0], sin[:, 0], cache.k[self.layer_id],
                                         cache.v[self.layer_id], positions[:, 0], self.window, kv_len,
                                         *cache.prompt_segment(self.layer_id))
            return self.wo(out.reshape(bsz, 1, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.write(self.layer_id, positions, k, v, cache_rows)
        if kind == "ragged":  # each row's live keys only
            out = ragged_decode_attention(q.transpose(1, 2), cache.k[self.layer_id], cache.v[self.layer_id],
                                          positions[:, 0], self.window)
        elif cache is not None and cache_rows is None:  # continue every row from what its cache holds
            keys, values = cache.read(self.layer_id, kv_len, bsz)
            out = grouped_attention(q.transpose(1, 2), keys, values, mask)
        else:  # no cache, or prefilling some rows of it from position 0: the fresh keys are all there is
            # mask None is forward_hidden's word for plain causal attention over S queries and the same
            # S keys (a Python fact, never symbolic); at S = 1 causal and full attention are the same,
            # so no test on the length: under torch.compile with varying lengths `seqlen > 1` is a
            # symbolic bool that SDPA refuses (a graph break per block, eager checkpointed blocks)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                is_causal=mask is None, enable_gqa=self.n_local_heads != self.n_local_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


def prompt_groups(prompt_of: torch.Tensor, n_prompt_rows: int) -> tuple:
    """How rows reading a shared prompt segment group by prompt row: (the prompt rows in use, None
    when all are; each row's group among them [B]; its rank within its group [B], in row order; the
    largest group's size, a host int)."""
    used, group, counts = torch.unique(prompt_of, return_inverse=True, return_counts=True)
    order = torch.argsort(group, stable=True)  # the rows of group 0, then of group 1, ...
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=group.device) - starts[group[order]]
    return (None if used.numel() == n_prompt_rows else used), group, rank, int(counts.max())


class SharedPromptBlock:
    """Keys or values [U, Hkv, W, D] of U prompt rows that several batch rows read: row b is member
    rank[b] (of at most `members`) of prompt row group[b]. A prompt's rows meet its keys as one matrix
    of queries (members x group query heads), so each prompt row is read once a step, not once a row."""

    def __init__(self, tensor: torch.Tensor, group: torch.Tensor, rank: torch.Tensor, members: int):
        self.tensor, self.group, self.rank, self.members = tensor, group, rank, members
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def per_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, R, X] -> [U, Hkv, members * R, X] (zeros where a group has fewer members)."""
        _, heads, r, width = x.shape
        out = x.new_zeros(self.tensor.shape[0], self.members, heads, r, width)
        out[self.group, self.rank] = x
        return out.transpose(1, 2).reshape(self.tensor.shape[0], heads, self.members * r, width)

    def per_row(self, y: torch.Tensor) -> torch.Tensor:
        """[U, Hkv, members * R, X] -> [B, Hkv, R, X]."""
        groups, heads, _, width = y.shape
        return y.view(groups, heads, self.members, -1, width).transpose(1, 2)[self.group, self.rank]

    def matmul_by(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x [B, Hkv, R, ·] @ each row's block (transposed: its keys' scores) -> [B, Hkv, R, ·]."""
        return self.per_row(torch.matmul(self.per_prompt(x), self.tensor.transpose(-1, -2) if transpose else self.tensor))


def _block_matmul(x: torch.Tensor, block, transpose: bool = False) -> torch.Tensor:
    if isinstance(block, SharedPromptBlock):
        return block.matmul_by(x, transpose)
    return torch.matmul(x, block.transpose(-1, -2) if transpose else block)


def grouped_attention(q: torch.Tensor, keys, values, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a few new queries over cached keys, each KV head read once for its group of
    query heads (SDPA's GQA path with a mask copies every KV head per query head first).
    q: [B, Hq, S, D]; keys/values: [B, Hkv, T, D], or blocks of them along T (a tuple: scored one
    by one, their scores joined, so the blocks are never copied into one; a block may be a
    SharedPromptBlock); mask: [B, 1, S, T] bool. Returns [B, Hq, S, D]."""
    blocks_k, blocks_v = (keys, values) if isinstance(keys, tuple) else ((keys,), (values,))
    bsz, n_heads, seqlen, head_dim = q.shape
    n_kv = blocks_k[0].shape[1]
    group = n_heads // n_kv
    q = q.reshape(bsz, n_kv, group * seqlen, head_dim)  # query head h reads KV head h // group
    scores = [_block_matmul(q, k, transpose=True) for k in blocks_k]
    scores = (scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)) * head_dim ** -0.5
    mask = mask[:, :, None].expand(bsz, 1, group, seqlen, mask.shape[-1]).reshape(bsz, 1, group * seqlen, -1)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(blocks_v[0].dtype)
    if len(blocks_v) == 1:
        out = torch.matmul(probs, blocks_v[0])
    else:
        parts = probs.split([v.shape[2] for v in blocks_v], dim=-1)
        out = torch.stack([_block_matmul(p, v) for p, v in zip(parts, blocks_v)]).sum(0)
    return out.reshape(bsz, n_heads, seqlen, head_dim)


def ragged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                            window: Optional[int] = None, block: int = 64) -> torch.Tensor:
    """One new query per row over that row's cached keys at slots [0, position] (and > position -
    window), reading only the blocks of `block` slots that hold them, not the batch's longest length:
    each (row, block) pair is scored alone (its max, sum of exponentials and weighted values) and the
    pairs of a row merged by log-sum-exp, as flash-decoding splits a row's keys. Shapes depend on the
    positions (a host sync on a GPU; not for a captured step).
    q: [B, Hq, 1, D]; keys/values: a cache layer [rows >= B, Hkv, max_len, D]; positions: [B]."""
    bsz, n_heads, _, head_dim = q.shape
    n_kv, max_len, dev = keys.shape[1], keys.shape[2], q.device
    group = n_heads // n_kv
    first = torch.zeros_like(positions) if window is None else (positions - window + 1).clamp(min=0)
    counts = positions // block - first // block + 1  # blocks per row, each holding a visible slot
    row = torch.repeat_interleave(torch.arange(bsz, device=dev), counts)
    blk = first[row] // block + torch.arange(row.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[row]
    slots = blk[:, None] * block + torch.arange(block, device=dev)  # [P, block]
    valid = (slots <= positions[row, None]) & (slots >= first[row, None])
    slots = slots.clamp(max=max_len - 1)
    k, v = keys[row[:, None], :, slots], values[row[:, None], :, slots]  # [P, block, Hkv, D]
    qp = q[row, :, 0].reshape(-1, n_kv, group, head_dim)
    scores = torch.einsum("pkgd,ptkd->pkgt", qp, k).float() * head_dim ** -0.5
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    peak = scores.amax(-1)  # [P, Hkv, group]
    probs = torch.exp(scores - peak[..., None])
    part = torch.einsum("pkgt,ptkd->pkgd", probs.to(v.dtype), v).float()
    top = torch.full((bsz, n_kv, group), float("-inf"), device=dev).scatter_reduce_(
        0, row[:, None, None].expand_as(peak), peak, "amax")
    weight = torch.exp(peak - top[row])
    total = torch.zeros(bsz, n_kv, group, device=dev).index_add_(0, row, weight * probs.sum(-1))
    out = torch.zeros(bsz, n_kv, group, head_dim, device=dev).index_add_(0, row, weight[..., None] * part)
    return (out / total[..., None]).to(q.dtype).reshape(bsz, n_heads, 1, head_dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = ColumnParallelLinear(args.dim, args.hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(args.hidden_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(args.dim, args.hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.fused = None  # (weight, None) of w1/w3 in one matrix, see Transformer.fuse_projections

    def forward(self, x):
        if self.fused is not None:
            gate, up = F.linear(x, *self.fused).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _unmerged_lora(linears) -> bool:
    """Whether any of these layers carries a LoRA adapter not merged into its weight (it then runs apart)."""
    return any(getattr(m, "lora_A", None) is not None and not m.merged for m in linears)


def _fuse_columns(linears) -> tuple:
    """One matrix (and bias) stacking column-parallel layers' local weights on the output dimension;
    the layers' parameters become views into it, so it costs no memory."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[start:start + n]
        if bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias


class Expert(nn.Module):
    """One expert's local shards: w1/w3 split on the output (like ColumnParallelLinear), w2 on the
    input (like RowParallelLinear). The all-reduce happens once for all experts in MoE.forward."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        local = args.hidden_dim // get_model_parallel_world_size()
        self.w1 = nn.Linear(args.dim, local, bias=False, device="meta")
        self.w2 = nn.Linear(local, args.dim, bias=False, device="meta")
        self.w3 = nn.Linear(args.dim, local, bias=False, device="meta")

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _stack_experts(experts) -> tuple:
    """Every expert's gate/up in one tensor [E, 2 x local, dim] and its down projection in another
    [E, dim, local], the experts' parameters views into them (no memory), so a decode kernel reaches
    any expert's weights by its index."""
    gate_up = torch.stack([torch.cat([e.w1.weight.detach(), e.w3.weight.detach()]) for e in experts])
    down = torch.stack([e.w2.weight.detach() for e in experts])
    local = experts[0].w1.weight.shape[0]
    for i, e in enumerate(experts):
        e.w1.weight.data, e.w3.weight.data, e.w2.weight.data = gate_up[i, :local], gate_up[i, local:], down[i]
    return gate_up, down


def _bf16_aligned(*weights: torch.Tensor) -> bool:
    """Stacked [E, out, in] weights that torch's compiled (and CUTLASS's) grouped matmul takes: bf16,
    rows of a multiple of 16 bytes."""
    return all(w.dtype == torch.bfloat16 and w.shape[1] % 8 == 0 and w.shape[2] % 8 == 0 for w in weights)


def grouped_matmul_runs_on(*weights: torch.Tensor) -> bool:
    """Whether torch's grouped matmul runs without waiting for the host on `weights` (stacked [E, out,
    in]): CUTLASS's kernel on SM90 / SM100 in bf16 with 16-byte aligned rows (elsewhere on a GPU torch
    falls back to a loop that reads the group offsets on the host, which a CUDA graph cannot
    capture), or the CPU's."""
    device = weights[0].device
    if device.type == "cpu":
        return True
    nvidia = device.type == "cuda" and torch.version.hip is None  # ROCm's numbering means other chips
    return nvidia and _bf16_aligned(*weights) and torch.cuda.get_device_capability(device)[0] in (9, 10)


def grouped_experts(x, weights, chosen, gate_up, down):
    """[N, dim]: each row's chosen experts' SwiGLU, weighted by the router and summed, as two grouped
    matmuls over the (row, choice) pairs sorted by expert (gate_up [E, 2 x local, dim], down [E, dim,
    local]: _stack_experts). Shapes depend on N only and nothing waits for the host, so a CUDA graph
    captures it, and it does only the chosen experts' work (the dense static route: every expert's)."""
    n, k = chosen.shape
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)  # pair order[i] is the i-th by expert
    experts = torch.arange(gate_up.shape[0], device=flat.device)
    ends = torch.searchsorted(flat[order], experts, right=True, out_int32=True)  # where each expert's pairs end
    gate, up = F.grouped_mm(x[order // k], gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=ends)
    pairs = torch.empty_like(y).index_copy_(0, order, y)  # back in (row, choice) order
    return (pairs.float() * weights.reshape(-1, 1)).to(x.dtype).view(n, k, -1).sum(1)


def experts_one_by_one(x, weights, chosen, gate_up, down) -> torch.Tensor:
    """grouped_experts's result in fp32, written as a loop over the experts (each on its rows)."""
    out = torch.zeros(x.shape[0], down.shape[1], device=x.device)
    for e in range(gate_up.shape[0]):
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        gate, up = (x[rows].float() @ gate_up[e].float().T).chunk(2, dim=-1)
        out.index_add_(0, rows, weights[rows, slot, None].float() * ((F.silu(gate) * up) @ down[e].float().T))
    return out


def grouped_check(gate_up: torch.Tensor, down: torch.Tensor, top_k: int, rows: int = 3) -> Optional[str]:
    """None when grouped_experts on these stacked experts gives experts_one_by_one's result for `rows`
    random rows, else why not, in a few words: what the grouped route's first use on a device checks
    (a torch build whose grouped matmul fails there keeps the every-expert route, and says so)."""
    gen = torch.Generator(device=gate_up.device).manual_seed(0)
    x = torch.randn(rows, gate_up.shape[2], device=gate_up.device, generator=gen).to(gate_up.dtype)
    weights = torch.rand(rows, top_k, device=x.device, generator=gen).softmax(-1)
    chosen = torch.rand(rows, gate_up.shape[0], device=x.device, generator=gen).topk(top_k, dim=-1)[1]
    try:
        with torch.no_grad():
            got = grouped_experts(x, weights, chosen, gate_up, down).float()
            want = experts_one_by_one(x, weights, chosen, gate_up, down)
    except Exception as e:
        return f"torch's grouped matmul failed ({' '.join(str(e).split())[:160]})"
    err = float((got - want).norm() / want.norm())
    if not err < (1e-4 if gate_up.dtype == torch.float32 else 3e-2):  # NaN fails too
        return f"its result differs from a loop over the experts (relative error {err:.2g})"
    return None


class MoE(nn.Module):
    """Mixtral sparse MoE: softmax router (fp32), top-k experts per token, weights renormalised."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.n_experts_per_tok
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False, device="meta")
        self.experts = nn.ModuleList(Expert(args) for _ in range(args.n_experts))
        self.static_shapes = False  # set by Transformer.static_shapes(): route without a host sync
        self.stacked = None  # (gate/up [E, 2 local, dim], down [E, dim, local]), see Transformer.fuse_projections
        self.grouped = False  # with static_shapes: route by grouped matmuls (set by Transformer.static_shapes())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # every rank computes a partial expert output: these make the backward sum the partial
        # gradients of the (replicated) router and input across the tensor-parallel group
        weights = copy_to_tp(weights)
        x_par = copy_to_tp(x)

        # compiled, torch's grouped matmul takes bf16 with 16-byte aligned rows only
        if self.static_shapes and self.grouped and (not torch.compiler.is_compiling() or _bf16_aligned(*self.stacked)):
            return reduce_from_tp(grouped_experts(x_par, weights, chosen, *self.stacked)).view(shape)
        out = torch.zeros_like(x)
        if self.static_shapes:  # every expert sees every token, weighted 0 where not chosen: no host sync
            dense = torch.zeros_like(probs).scatter(1, chosen, weights)
            for e, expert in enumerate(self.experts):
                out += (expert(x_par).float() * dense[:, e:e + 1]).to(out.dtype)
            return reduce_from_tp(out).view(shape)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        token_of, weight_of = order // self.top_k, weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # the host sync
        start = 0
        for expert, count in zip(self.experts, counts):  # a loop over experts, never over tokens
            if count:
                tokens = token_of[start:start + count]
                y = expert(x_par[tokens]).float() * weight_of[start:start + count, None]
                out.index_add_(0, tokens, y.to(out.dtype))
                start += count
        return reduce_from_tp(out).view(shape)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = MoE(args) if args.n_experts else FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, positions, mask, cache=None, kv_len=None, cache_rows=None):
        if cache is not None and cache_rows is None and self._fused_layer(x):
            return self._fused_decode(x, cos, sin, positions, cache, kv_len)
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, mask, cache, kv_len, cache_rows)
        return h + self.feed_forward(self.ffn_norm(h))

    def _fused_layer(self, x) -> bool:
        """Whether this decode step runs the layer as a few kernels (_fused_decode): --decode_attention
        fused where the kernels run, one token of at most MAX_LINEAR_ROWS rows (for an MoE layer at
        most as many choices as experts), fused projections (or stacked experts) without an unmerged
        LoRA adapter, no autocast (the kernels take the weights' dtype)."""
        att, ffn = self.attention, self.feed_forward
        if att.decode_kind != "fused" or x.shape[1] != 1 or x.shape[0] > decode_kernels.MAX_LINEAR_ROWS:
            return False
        if att.fused is None or (ffn.stacked if isinstance(ffn, MoE) else ffn.fused) is None:
            return False
        if isinstance(ffn, MoE) and x.shape[0] * ffn.top_k > len(ffn.experts):  # the kernel reads an expert once
            return False  # a choice: past len(experts) choices, running every expert (MoE.forward) reads less
        if _unmerged_lora([att.wo] if isinstance(ffn, MoE) else [att.wo, ffn.w2]):  # experts never carry LoRA
            return False
        return decode_kernels.kernels_run_on(x.device) and not torch.is_autocast_enabled(x.device.type)

    def _fused_decode(self, x, cos, sin, positions, cache, kv_len):
        """The block for one decode token in five kernels: RMSNorm + q/k/v projection; RoPE + cache
        write + attention; output projection + residual; RMSNorm + gate/up projection; SwiGLU + down
        projection + residual (under tensor parallelism the residuals are added after the all-reduce).
        An MoE layer's last two are three (_fused_experts)."""
        att, ffn, linear = self.attention, self.feed_forward, decode_kernels.decode_linear
        bsz = x.shape[0]
        x2 = x.reshape(bsz, -1)
        qkv = linear(x2, att.fused[0], att.fused[1], self.attention_norm.weight, None, self.attention_norm.eps, False)
        out = fused_decode_attention(*att.heads(qkv), cos[:, 0], sin[:, 0], cache.k[att.layer_id],
                                     cache.v[att.layer_id], positions[:, 0], att.window, kv_len,
                                     *cache.prompt_segment(att.layer_id))
        one_rank = get_model_parallel_world_size() == 1
        a = out.reshape(bsz, -1)
        h = linear(a, att.wo.weight, None, None, x2, 0.0, False) if one_rank else \
            x2 + reduce_from_tp(linear(a, att.wo.weight, None, None, None, 0.0, False))
        if isinstance(ffn, MoE):
            return self._fused_experts(h, one_rank).view(bsz, 1, -1)
        gate_up = linear(h, ffn.fused[0], None, self.ffn_norm.weight, None, self.ffn_norm.eps, False)
        y = linear(gate_up, ffn.w2.weight, None, None, h, 0.0, True) if one_rank else \
            h + reduce_from_tp(linear(gate_up, ffn.w2.weight, None, None, None, 0.0, True))
        return y.view(bsz, 1, -1)

    def _fused_experts(self, h, one_rank: bool):
        """The MoE half of a fused decode step, reading only the chosen experts' weights in two
        kernels (MoE.forward's grouped route takes about ten operations, its dense one every expert):
        RMSNorm + router; its top-k, their softmax; RMSNorm + each row's chosen experts' gate/up;
        SwiGLU + their down projections, weighted, summed, + residual. The softmax over the chosen logits is MoE.forward's renormalised top-k of the softmax
        over all (the same ratios exp(l_j) / sum of the chosen), and softmax keeps the logits' order."""
        moe, norm = self.feed_forward, self.ffn_norm
        logits = decode_kernels.decode_linear(h, moe.gate.weight, None, norm.weight, None, norm.eps, False)
        top, chosen = logits.float().topk(moe.top_k, dim=-1)
        coeffs = torch.softmax(top, dim=-1)
        gate_up, down = moe.stacked
        experts = decode_kernels.decode_expert_linear
        hidden = experts(h, gate_up, chosen, None, norm.weight, None, norm.eps, False)
        if one_rank:
            return experts(hidden, down, chosen, coeffs, None, h, 0.0, True)
        return h + reduce_from_tp(experts(hidden, down, chosen, coeffs, None, None, 0.0, True))


CHECKPOINT_POLICIES = ("none", "full", "selective")

# selective checkpointing keeps these results (the expensive ones) and recomputes everything else
_KEEP_IN_SELECTIVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                      torch.ops.aten._scaled_dot_product_flash_attention.default,
                      torch.ops.aten._scaled_dot_product_efficient_attention.default,
                      torch.ops.aten._scaled_dot_product_cudnn_attention.default,
                      torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _KEEP_IN_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(layer: nn.Module, selective: bool):
    """A block call that recomputes the block (all of it, or all but _KEEP_IN_SELECTIVE) in backward."""
    context = functools.partial(create_selective_checkpoint_contexts, _selective_policy) if selective else None

    def run(*args):
        if context is None:
            return checkpoint(layer, *args, use_reentrant=False)
        return checkpoint(layer, *args, use_reentrant=False, context_fn=context)

    return run


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        device = torch.device(device or "cpu")
        self.args = args
        self.tp_size = get_model_parallel_world_size()
        self.tp_rank = get_model_parallel_rank()
        self._grouped_checks = {}  # (device, dtype) -> whether the grouped MoE route passed grouped_check there
        self.in_static_shapes = False  # within static_shapes()
        args.check_tp(self.tp_size, where="the tensor-parallel size")
        self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, init_method=_keep)
        _materialize(self.tok_embeddings, device, dtype)
        self.layers = nn.ModuleList()
        for layer_id in range(args.n_layers):
            block = TransformerBlock(args, layer_id)
            _materialize(block, device, dtype)
            self.layers.append(block)
        self.norm = RMSNorm(args.dim, args.norm_eps, device=device, dtype=dtype)
        if args.tie_embeddings:
            self.output = None
        else:
            self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, gather_output=False,
                                               init_method=_keep)
            _materialize(self.output, device, dtype)
        self.rope = RotaryEmbedding(args)
        self.configure_layers()

    def configure_layers(self, policy: str = "none", fraction: float = 1.0, compiled: bool = False) -> None:
        """How the blocks run. In training with gradients: activation checkpointing (`policy`) of the
        first `fraction` of the layers ("full": keep each block's input only and recompute the block in
        backward; "selective": also keep the outputs of matmuls and attention, recompute norms, RoPE
        and element-wise ops); and, when `compiled`, each block compiled on its own (regional
        torch.compile: short compile times, one graph shared by all layers, checkpointing inside the
        compiled region).
        The tensor-parallel all-reduces sit inside the compiled blocks as functional collectives
        (models/parallel.py). Calls with a KV cache (generation) always run the plain blocks."""
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoint policy {policy!r} is not one of {', '.join(CHECKPOINT_POLICIES)}")
        n_checkpointed = 0 if policy == "none" else round(fraction * len(self.layers))
        self.train_calls, self.eval_calls = [], []
        for i, layer in enumerate(self.layers):
            call = _checkpointed(layer, policy == "selective") if i < n_checkpointed else layer
            self.train_calls.append(CompiledCall(call, "decoder block") if compiled else call)
            self.eval_calls.append(CompiledCall(layer, "decoder block") if compiled else layer)
        self.checkpoint_policy = (policy, n_checkpointed)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """For inference: q/k/v, and gate/up, of each layer as one matrix each, so a decode step runs
        fewer, larger matmuls (each layer's input is read once per group). Same weights: the separate
        parameters become views of the fused ones. Layers with an unmerged LoRA adapter stay apart. An
        MoE layer's experts are stacked instead (_stack_experts), for the fused decode step's kernels."""
        for layer in self.layers:
            parts = [layer.attention.wq, layer.attention.wk, layer.attention.wv]
            if not _unmerged_lora(parts):
                layer.attention.fused = _fuse_columns(parts)
            ffn = layer.feed_forward
            if isinstance(ffn, MoE):  # experts never carry LoRA
                ffn.stacked = _stack_experts(ffn.experts)
            elif not _unmerged_lora([ffn.w1, ffn.w3]):
                ffn.fused = _fuse_columns([ffn.w1, ffn.w3])

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpoint_policy[1] > 0

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.configure_layers("full" if on else "none")

    @property
    def head_weight(self) -> torch.Tensor:
        """The local vocabulary shard of the output head [vocab / tp, dim]."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def decode_attention(self, kind: str) -> None:
        """"dense": a decode step reads slots [0, kv_len) of every row (batched matmuls); "ragged":
        each row's own live slots only (ragged_decode_attention), outside static_shapes(); "fused":
        RoPE, the cache write and attention over each row's live slots in one Triton kernel on a GPU
        (models/decode_kernels.py; its torch twin elsewhere), static shapes included; "auto": fused on
        a GPU where the kernel passes a check against its twin (once per shape), else dense."""
        if kind not in DECODE_ATTENTION:
            raise ValueError(f"decode attention {kind!r} is not one of {', '.join(DECODE_ATTENTION)}")
        if kind == "auto":
            kind = self._auto_decode_attention()
        for layer in self.layers:
            layer.attention.decode_kind = kind

    def _auto_decode_attention(self) -> str:
        """"fused" where the Triton kernel runs (a GPU; the CPU under decode_kernels.CPU_KERNEL) and
        passes its check against the twin, else "dense"."""
        w = self.head_weight
        if w.device.type != "cuda" and not decode_kernels.CPU_KERNEL:
            return "dense"
        args = self.args
        why = decode_kernels.kernel_check(str(w.device), w.dtype, args.n_heads // self.tp_size,
                                          args.local_kv_heads(self.tp_size), args.head_dim, args.sliding_window)
        say_once("decode attention: fused Triton kernel" if why is None else
                 f"decode attention: dense (the fused Triton kernel is not used: {why})")
        return "fused" if why is None else "dense"

    def _grouped_route(self, moes) -> bool:
        """Whether static_shapes() routes the MoE layers by grouped matmuls: stacked experts where
        torch's grouped matmul runs without the host and passes grouped_check on the first layer's
        experts (once per device and dtype; one line says so where it does not)."""
        if not moes or moes[0].stacked is None or not grouped_matmul_runs_on(*moes[0].stacked):
            return False
        gate_up = moes[0].stacked[0]
        key = (str(gate_up.device), gate_up.dtype)
        if key not in self._grouped_checks:
            why = grouped_check(*moes[0].stacked, moes[0].top_k)
            self._grouped_checks[key] = why is None
            if why is not None:
                say_once(f"MoE: every expert on every row in the static decode step (the grouped route is not "
                         f"used: {why})")
        return self._grouped_checks[key]

    @contextlib.contextmanager
    def static_shapes(self):
        """Within: no operation waits for the GPU or depends on data for its shapes (the MoE routes by
        grouped matmuls where they run without the host, else densely; decode attention is dense or
        the fused kernel), so a forward can be captured in a CUDA graph."""
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        kinds = [layer.attention.decode_kind for layer in self.layers]
        grouped = self._grouped_route(moes)
        for m in moes:
            m.static_shapes, m.grouped = True, grouped
        self.in_static_shapes = True
        for layer in self.layers:  # the fused kernel's grid depends on shapes only: it stays
            layer.attention.decode_kind = "fused" if layer.attention.decode_kind == "fused" else "dense"
        try:
            yield
        finally:
            for m in moes:
                m.static_shapes = m.grouped = False
            self.in_static_shapes = False
            for layer, was in zip(self.layers, kinds):
                layer.attention.decode_kind = was

    def new_cache(self, batch_size: int, max_len: int, dtype=None, prompts: Optional[tuple] = None) -> KVCache:
        """prompts: (rows, length) of a shared prompt segment (see KVCache), or None."""
        w = self.tok_embeddings.weight
        shared = None if prompts is None else self.new_cache(*prompts, dtype=dtype)
        return KVCache(self.args, batch_size, max_len, w.device, dtype or w.dtype, self.tp_size, shared)

    def forward_hidden(self, tokens: torch.Tensor, start_pos: int = 0, positions: Optional[torch.Tensor] = None,
                       cache: Optional[KVCache] = None, kv_len: Optional[int] = None,
                       cache_rows: Optional[torch.Tensor] = None, layer_hook=None) -> torch.Tensor:
        """Final-norm hidden states [B, S, dim].

        positions: [B, S] absolute positions per token (default start_pos + 0..S-1 for every row);
        rows may sit at different positions (generation with prompts of different lengths).
        cache: keys/values are written at `positions` and attention reads slots [0, kv_len).
        cache_rows: prefill these cache rows (one per input row) with sequences starting at position 0;
            attention then uses the fresh keys only (the other rows of the cache are untouched).
        layer_hook: layer_hook(l, h) -> h runs on the input of every block l (outside compiled or
            checkpointed blocks): it may read h, or return a tensor replacing it (implicit chain of thought).
        """
        bsz, seqlen = tokens.shape
        contiguous_from_start = positions is None and start_pos == 0
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device).expand(bsz, seqlen)
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope(positions, h.dtype)
        window = self.args.sliding_window
        if cache is not None and cache_rows is None:
            if kv_len is None:
                kv_len = int(positions.max()) + 1
            mask = attention_mask(positions, cache.key_positions(kv_len, bsz, tokens.device), window)
        elif contiguous_from_start and (window is None or seqlen <= window):
            mask = None  # plain causal attention: SDPA's fused causal path
        else:
            mask = attention_mask(positions, positions, window)
        if cache is not None:
            calls = self.layers
        else:
            calls = self.train_calls if self.training and torch.is_grad_enabled() else self.eval_calls
        by_prompt = (cache is not None and cache_rows is None and cache.prompts is not None
                     and not self.in_static_shapes and not torch.compiler.is_compiling())
        with cache.grouped_by_prompt() if by_prompt else contextlib.nullcontext():
            for i, call in enumerate(calls):
                if layer_hook is not None:
                    h = layer_hook(i, h)
                h = call(h, cos, sin, positions, mask, cache, kv_len, cache_rows)
        return self.norm(h)

    def head_matrix(self) -> Optional[torch.Tensor]:
        """This rank's head as one matrix [vocab / tp, dim] for the chunked loss: the weight, plus
        scaling * B @ A when a LoRA adapter sits on the head (A enters through copy_to_tp so its
        gradient sums over the vocabulary shards). None when no single matrix is the head (LoRA with
        dropout on its input): then use logits()."""
        head = self.output
        if head is None or getattr(head, "lora_A", None) is None or head.merged:
            return self.head_weight
        if not isinstance(head.lora_dropout, nn.Identity):
            return None
        delta = head.lora_B @ copy_to_tp(head.lora_A)
        return head.weight + (delta * head.lora_scaling).to(head.weight.dtype)

    def logits(self, h: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Project hidden states to the vocabulary. gather=False keeps this rank's vocabulary shard
        [..., vocab / tp] (for vocabulary-parallel losses)."""
        if self.output is not None:  # called as a module, so a LoRA adapter on the head takes part
            local = self.output(h)
        else:
            local = F.linear(copy_to_tp(h), self.head_weight)
        return gather_from_tp(local) if gather else local

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, positions: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, kv_len: Optional[int] = None, gather: bool = True,
                last_only: bool = False) -> torch.Tensor:
        h = self.forward_hidden(tokens, start_pos, positions, cache, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.logits(h, gather=gather)
