"""One decode step's attention of a layer as one Triton kernel (and a small merge): RoPE of the new
query and key, the new key and value written into the KV cache, and flash-decoding attention of each
row's query heads over that row's live slots only (positions [first, position], first > 0 with a
sliding window), its keys split into pieces scored by separate programs and merged by log-sum-exp.

Why: at batch 1 a decode step is launch-bound (RoPE, two cache writes, scores, mask, softmax and the
weighted sum are ~6 kernels per layer in eager PyTorch); at large batch the dense read of every row
up to the batch's longest reads more KV than needed. The grid depends only on the batch, the KV
heads and the bucketed KV length, so a CUDA graph captures it; each program skips the blocks past
its row's position.

`fused_decode_attention` is the entry point: the Triton kernel on a GPU (or on the CPU under
TRITON_INTERPRET=1, which is how the tests run the kernel itself); its torch twin `reference`
computes the same thing with plain operations. The interpreter checks what the kernels compute, not
how they compile: `bench/kernel_build.py` builds them for SM80 / SM90 / SM100 without a GPU and says
what each variant takes of a multiprocessor (registers, spills, shared memory, tensor-core dots).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BLOCK_N = 64  # cache slots scored per loop iteration of a program
CPU_KERNEL = False  # on the CPU, run the kernel (TRITON_INTERPRET=1 set before triton is imported): tests


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] rotated by the rotate-half convention with cos/sin [B, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def segment_key_positions(prompt_len: torch.Tensor, width: int, length: int) -> torch.Tensor:
    """[rows, width + length]: the positions of a prompt segment's slots (those past each row's
    prompt at a position no query reaches) then of `length` own slots (models.transformer.KVCache)."""
    prompt = torch.arange(width, device=prompt_len.device).expand(prompt_len.shape[0], -1)
    own = prompt_len[:, None] + torch.arange(length, device=prompt_len.device)
    return torch.cat([prompt.masked_fill(prompt >= prompt_len[:, None], 1 << 40), own], dim=1)


def reference(q, k, v, cos, sin, k_cache, v_cache, positions, window: Optional[int], kv_len: int,
              prompt_k=None, prompt_v=None, prompt_of=None, prompt_len=None) -> torch.Tensor:
    """The torch twin of the kernel. q [B, Hq, D], k/v [B, Hkv, D] (q and k before RoPE), cos/sin
    [B, D], caches [rows >= B, Hkv, max_len, D], positions [B]: writes k (rotated) and v at each row's
    position and returns [B, Hq, D], the attention of each row's queries over positions [first, position].
    With a shared prompt segment (prompt_k/v [prompt rows, Hkv, width, D]; models.transformer.KVCache):
    row b reads positions [0, prompt_len[b]) from prompt row prompt_of[b] and keeps position p at slot
    p - prompt_len[b] of its own cache (kv_len: its own slots read)."""
    bsz, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
    rows = torch.arange(bsz, device=q.device)
    slots = torch.arange(kv_len, device=q.device)[None].expand(bsz, -1)  # the positions of the keys read
    own = positions
    if prompt_k is not None:
        own = (positions - prompt_len[:bsz]).clamp(0, k_cache.shape[2] - 1)
        slots = segment_key_positions(prompt_len[:bsz], prompt_k.shape[2], kv_len)
    k_cache[rows, :, own] = k.to(k_cache.dtype)
    v_cache[rows, :, own] = v.to(v_cache.dtype)
    keys, values = k_cache[:bsz, :, :kv_len], v_cache[:bsz, :, :kv_len]
    if prompt_k is not None:
        keys = torch.cat([prompt_k.index_select(0, prompt_of[:bsz]), keys], 2)
        values = torch.cat([prompt_v.index_select(0, prompt_of[:bsz]), values], 2)
    visible = slots <= positions[:, None]
    if window is not None:
        visible &= positions[:, None] - slots < window
    scores = torch.einsum("bkgd,bktd->bkgt", q.reshape(bsz, n_kv, -1, head_dim).float(), keys.float())
    scores = (scores * head_dim ** -0.5).masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgt,bktd->bkgd", probs, values.float())
    return out.reshape(bsz, n_heads, head_dim).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels, built at the first call (so that importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def partials(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
                 pk_ptr, pv_ptr, pof_ptr, plen_ptr,
                 sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_t, so_b, so_h, sp_b, sp_h, sp_t, own_len,
                 scale, window, n_splits, split_len,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK: tl.constexpr, WINDOWED: tl.constexpr, ONE_PIECE: tl.constexpr, SHARED: tl.constexpr,
                 FP32_DOTS: tl.constexpr):
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        half: tl.constexpr = HEAD_DIM // 2
        d = tl.arange(0, D_PAD)
        g = tl.arange(0, G_PAD)
        d_ok, g_ok = d < HEAD_DIM, g < GROUP
        partner = tl.where(d < half, d + half, d - half)  # rotate-half: x[d] pairs with x[partner]
        sign = tl.where(d < half, -1.0, 1.0)
        pos = tl.load(pos_ptr + b)
        cos = tl.load(cos_ptr + b * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)
        q_rows = q_ptr + b * sq_b + (h * GROUP + g[:, None]) * sq_h
        q_mask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q_pair = tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q = (q * cos[None, :] + sign[None, :] * q_pair * sin[None, :]) * scale
        k_new = tl.load(k_ptr + b * sk_b + h * sk_h + d, mask=d_ok, other=0.0).to(tl.float32)
        k_pair = tl.load(k_ptr + b * sk_b + h * sk_h + partner, mask=d_ok, other=0.0).to(tl.float32)
        k_new = k_new * cos + sign * k_pair * sin
        v_new = tl.load(v_ptr + b * sv_b + h * sv_h + d, mask=d_ok, other=0.0).to(tl.float32)
        kc = kc_ptr + b * sc_b + h * sc_h
        vc = vc_ptr + b * sc_b + h * sc_h
        plen = 0  # positions below plen are in the shared prompt segment, the rest at slot position - plen
        if SHARED:
            plen = tl.load(plen_ptr + b)
            pk = pk_ptr + tl.load(pof_ptr + b) * sp_b + h * sp_h
            pv = pv_ptr + tl.load(pof_ptr + b) * sp_b + h * sp_h
        if s == pos // split_len:  # the one program whose piece holds the new slot stores it
            slot = tl.minimum(tl.maximum(pos - plen, 0), own_len - 1)
            tl.store(kc + slot * sc_t + d, k_new.to(kc_ptr.dtype.element_ty), mask=d_ok)
            tl.store(vc + slot * sc_t + d, v_new.to(vc_ptr.dtype.element_ty), mask=d_ok)
        first = 0
        if WINDOWED:
            first = tl.maximum(pos - window + 1, 0)
        lo = tl.maximum(s * split_len, (first // BLOCK) * BLOCK)
        hi = tl.minimum((s + 1) * split_len, pos + 1)
        peak = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        # the dots in the cache's dtype (fp32 sums): on tensor cores for a 16-bit cache, as flash attention
        # does, where fp32 operands would run on the CUDA cores, 16 rows of them for a group of 1-8 heads;
        # the new key and value as the cache stores them, which is what later steps read
        dot_type = kc_ptr.dtype.element_ty
        q, k_new, v_new = q.to(dot_type), k_new.to(dot_type), v_new.to(dot_type)
        if FP32_DOTS:  # Triton's interpreter multiplies 16-bit operands wrongly: there, the same values in fp32
            q = q.to(tl.float32)
        for start in range(lo, hi, BLOCK):  # only blocks holding this row's visible slots
            t = start + tl.arange(0, BLOCK)
            seen = (t <= pos) & (t >= first) & (t < hi)
            if SHARED:  # a row past its own slots (decoding throw-away tokens) reads no further
                seen = seen & (t - plen < own_len)
            kv_mask = seen[:, None] & d_ok[None, :]
            key_at = kc + (t - plen)[:, None] * sc_t + d[None, :]
            value_at = vc + (t - plen)[:, None] * sc_t + d[None, :]
            if SHARED:  # a slot below the row's prompt length is in the prompt segment: one load either way
                in_prompt = (t < plen)[:, None]
                key_at = tl.where(in_prompt, pk + t[:, None] * sp_t + d[None, :], key_at)
                value_at = tl.where(in_prompt, pv + t[:, None] * sp_t + d[None, :], value_at)
            keys = tl.load(key_at, mask=kv_mask, other=0.0)
            vals = tl.load(value_at, mask=kv_mask, other=0.0)
            fresh = (t == pos)[:, None]  # the new slot comes from registers: another program may not have stored it
            keys = tl.where(fresh, k_new[None, :], keys)
            vals = tl.where(fresh, v_new[None, :], vals)
            if FP32_DOTS:
                keys, vals = keys.to(tl.float32), vals.to(tl.float32)
            scores = tl.dot(q, tl.trans(keys), input_precision="ieee")  # (the precision of fp32 operands)
            scores = tl.where(seen[None, :], scores, float("-inf"))
            new_peak = tl.maximum(peak, tl.max(scores, axis=1))
            safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)
            probs = tl.exp(scores - safe[:, None])
            rescale = tl.exp(peak - safe)
            total = total * rescale + tl.sum(probs, axis=1)
            weights = probs.to(dot_type)
            if FP32_DOTS:
                weights = weights.to(tl.float32)
            acc = acc * rescale[:, None] + tl.dot(weights, vals, input_precision="ieee")
            peak = new_peak
        if ONE_PIECE:  # the whole row in this program: the output itself, no merge kernel
            tl.store(out_ptr + b * so_b + (h * GROUP + g[:, None]) * so_h + d[None, :],
                     (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
        else:
            part = (b * tl.num_programs(1) + h) * n_splits + s
            tl.store(m_ptr + part * G_PAD + g, peak)
            tl.store(l_ptr + part * G_PAD + g, total)
            tl.store(acc_ptr + (part * G_PAD + g[:, None]) * D_PAD + d[None, :], acc)

    @triton.jit
    def merge(m_ptr, l_ptr, acc_ptr, out_ptr, so_b, so_h, n_splits,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        base = (b * tl.num_programs(1) + h) * n_splits
        top = tl.full([G_PAD], float("-inf"), tl.float32)
        for s in range(0, n_splits):
            top = tl.maximum(top, tl.load(m_ptr + (base + s) * G_PAD + g))
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for s in range(0, n_splits):
            w = tl.exp(tl.load(m_ptr + (base + s) * G_PAD + g) - top)  # 0 for pieces past the row's position
            total += w * tl.load(l_ptr + (base + s) * G_PAD + g)
            acc += w[:, None] * tl.load(acc_ptr + ((base + s) * G_PAD + g[:, None]) * D_PAD + d[None, :])
        out = acc / total[:, None]
        mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
        tl.store(out_ptr + b * so_b + (h * GROUP + g[:, None]) * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def linear(x_ptr, w_ptr, b_ptr, g_ptr, r_ptr, y_ptr, rows, n_out, k_in, sx, sw, sr, sy, eps,
               R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
               GLU: tl.constexpr, BIAS: tl.constexpr, RESID: tl.constexpr):
        """y[r, n] = sum_k W[n, k] x'[r, k] (+ bias[n]) (+ residual[r, n]) for a few rows r, each program
        BLOCK_N outputs; x' = RMSNorm(x) * g (NORM) or silu(gate) * up of x = [gate | up] (GLU)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, R_PAD)
        kk = tl.arange(0, BLOCK_K)
        n_ok, r_ok = n < n_out, r < rows
        inv_rms = tl.full([R_PAD], 1.0, tl.float32)
        if NORM:  # every program reads the few input rows once more for their norm: they sit in L2
            squares = tl.zeros([R_PAD], tl.float32)
            for k0 in range(0, k_in, BLOCK_K):
                k = k0 + kk
                xt = tl.load(x_ptr + r[:, None] * sx + k[None, :], mask=r_ok[:, None] & (k < k_in)[None, :],
                             other=0.0).to(tl.float32)
                squares += tl.sum(xt * xt, axis=1)
            inv_rms = 1.0 / tl.sqrt(squares / k_in + eps)
        # products kept per k lane and summed once after the loop: a sum across threads in every
        # iteration made the loop ~4x the instructions, too many to keep up with HBM at batch 1
        acc = tl.zeros([R_PAD, BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            k = k0 + kk
            k_ok = k < k_in
            x_mask = r_ok[:, None] & k_ok[None, :]
            xt = tl.load(x_ptr + r[:, None] * sx + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            if GLU:
                up = tl.load(x_ptr + r[:, None] * sx + k_in + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
                xt = xt * tl.sigmoid(xt) * up
            if NORM:
                g = tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                xt = xt * inv_rms[:, None] * g[None, :]
            xt = xt.to(w_ptr.dtype.element_ty).to(tl.float32)  # the input rounded as the layer's own input is
            w = tl.load(w_ptr + n[:, None] * sw + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            acc += xt[:, None, :] * w[None, :, :]
        acc = tl.sum(acc, axis=2)
        if BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out_mask = r_ok[:, None] & n_ok[None, :]
        if RESID:
            acc += tl.load(r_ptr + r[:, None] * sr + n[None, :], mask=out_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + r[:, None] * sy + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def expert_linear(x_ptr, w_ptr, g_ptr, r_ptr, y_ptr, e_ptr, c_ptr, n_out, k_in, sx, sw_e, sw, sr, sy, eps,
                      TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                      GLU: tl.constexpr, COMBINE: tl.constexpr, RESID: tl.constexpr):
        """For row r (program axis 1) and each of its TOP_K chosen experts e_j: y_j = W[e_j] x'_j, only
        the chosen experts' weights read. x'_j = RMSNorm(x[r]) * g (NORM: one input a row) or
        silu(gate) * up of x[r * TOP_K + j] = [gate | up] (GLU: one input a choice). COMBINE: one
        output a row, sum_j c[r, j] y_j (+ residual[r]); else one a choice, y[r * TOP_K + j] = y_j."""
        r = tl.program_id(1)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        n_ok = n < n_out
        if NORM:
            squares = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, k_in, BLOCK_K):
                xt = tl.load(x_ptr + r * sx + k0 + kk, mask=k0 + kk < k_in, other=0.0).to(tl.float32)
                squares += xt * xt
            inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / k_in + eps)
        total = tl.zeros([BLOCK_N], tl.float32)
        for j in tl.static_range(TOP_K):
            expert = tl.load(e_ptr + r * TOP_K + j).to(tl.int64)
            x_row = x_ptr + (r if NORM else r * TOP_K + j) * sx
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # summed after the loop, as in `linear`
            for k0 in range(0, k_in, BLOCK_K):
                k = k0 + kk
                k_ok = k < k_in
                xt = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
                if GLU:
                    up = tl.load(x_row + k_in + k, mask=k_ok, other=0.0).to(tl.float32)
                    xt = xt * tl.sigmoid(xt) * up
                if NORM:
                    xt = xt * inv_rms * tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                xt = xt.to(w_ptr.dtype.element_ty).to(tl.float32)  # the input rounded as the layer's own input is
                w = tl.load(w_ptr + expert * sw_e + n[:, None] * sw + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0.0).to(tl.float32)
                acc += w * xt[None, :]
            acc = tl.sum(acc, axis=1)
            if COMBINE:
                total += tl.load(c_ptr + r * TOP_K + j).to(tl.float32) * acc
            else:
                tl.store(y_ptr + (r * TOP_K + j) * sy + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
        if COMBINE:
            if RESID:
                total += tl.load(r_ptr + r * sr + n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + r * sy + n, total.to(y_ptr.dtype.element_ty), mask=n_ok)

    return partials, merge, linear, expert_linear


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def split_length(kv_len: int, programs: int, target: int = 512, one_piece_up_to: int = 256) -> int:
    """Slots per piece: whole blocks, enough pieces that batch x KV heads x pieces reaches about
    `target` programs (an H200 has 132 multiprocessors), never more pieces than blocks; one piece
    (no merge kernel) up to `one_piece_up_to` slots, which one program reads in about a kernel launch."""
    if kv_len <= one_piece_up_to:
        return kv_len
    blocks = -(-kv_len // BLOCK_N)
    pieces = max(1, min(blocks, -(-target // max(programs, 1))))
    return -(-blocks // pieces) * BLOCK_N


def triton_decode_attention(q, k, v, cos, sin, k_cache, v_cache, positions, window: Optional[int],
                            kv_len: int, prompt_k=None, prompt_v=None, prompt_of=None, prompt_len=None) -> torch.Tensor:
    """`reference`'s computation by the Triton kernels (see the module's docstring)."""
    bsz, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    shared = prompt_k is not None
    own_len = k_cache.shape[2]
    if shared:  # the pieces cover positions: the prompt segment's, then kv_len of the row's own
        kv_len += prompt_k.shape[2]
        assert prompt_k.stride() == prompt_v.stride() and prompt_k.stride(-1) == 1
    else:
        prompt_k = prompt_v = prompt_of = prompt_len = k_cache  # unused pointers
    g_pad, d_pad = max(16, _next_pow2(group)), max(16, _next_pow2(head_dim))
    # fp32 dots run on the CUDA cores out of registers: half a block spills a tenth as much (an SM90
    # build, head dim 128: 0.4 KB a thread against 3.8); pieces stay whole blocks (multiples of BLOCK_N)
    block = BLOCK_N if k_cache.element_size() < 4 else BLOCK_N // 2
    split = split_length(kv_len, bsz * n_kv)
    n_splits = -(-kv_len // split)
    peaks = torch.empty(bsz, n_kv, n_splits, g_pad, device=q.device, dtype=torch.float32)
    totals = torch.empty_like(peaks)
    accs = torch.empty(bsz, n_kv, n_splits, g_pad, d_pad, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    cos, sin, positions = cos.contiguous(), sin.contiguous(), positions.contiguous()
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    partials, merge, _, _ = _kernels()
    partials[(bsz, n_kv, n_splits)](
        q, k, v, cos, sin, k_cache, v_cache, positions, peaks, totals, accs, out, prompt_k, prompt_v, prompt_of,
        prompt_len, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        prompt_k.stride(0), prompt_k.stride(1), prompt_k.stride(2), own_len, head_dim ** -0.5,
        window or 0, n_splits, split, GROUP=group, HEAD_DIM=head_dim, G_PAD=g_pad, D_PAD=d_pad, BLOCK=block,
        WINDOWED=window is not None, ONE_PIECE=n_splits == 1, SHARED=shared, FP32_DOTS=_interpreting(),
        num_stages=2)  # K/V blocks in flight: two, as sglang's decode kernel; Triton's three took 1.5x the shared memory
    if n_splits > 1:
        merge[(bsz, n_kv)](peaks, totals, accs, out, out.stride(0), out.stride(1), n_splits,
                           GROUP=group, HEAD_DIM=head_dim, G_PAD=g_pad, D_PAD=d_pad)
    return out


MAX_LINEAR_ROWS = 4  # rows a decode step may have for the fused projections (a matrix-vector product)


def linear_reference(x, weight, bias=None, norm_weight=None, residual=None, eps: float = 1e-6,
                     glu: bool = False) -> torch.Tensor:
    """The twin of the `linear` kernel: x [R, K] (or [R, 2K] = [gate | up] with glu) -> [R, N]."""
    out_dtype = x.dtype if residual is None else residual.dtype
    x = _projection_input(x, weight.dtype, norm_weight, eps, glu)
    y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return (y if residual is None else y + residual.float()).to(out_dtype)


def _projection_input(x, dtype, norm_weight, eps: float, glu: bool) -> torch.Tensor:
    """What the projection kernels multiply: silu(gate) * up of x = [gate | up] (glu), or RMSNorm(x) *
    norm_weight, or x; rounded to the weights' dtype."""
    if glu:
        gate, up = x.float().chunk(2, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    if norm_weight is not None:
        x32 = x.float()
        x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(dtype)
    return x.to(dtype)


def triton_linear(x, weight, bias=None, norm_weight=None, residual=None, eps: float = 1e-6,
                  glu: bool = False) -> torch.Tensor:
    """`linear_reference`'s computation by the Triton kernel."""
    rows, n_out, k_in = x.shape[0], weight.shape[0], weight.shape[1]
    assert rows <= MAX_LINEAR_ROWS and x.stride(-1) == 1 and weight.stride(-1) == 1
    assert x.shape[1] == (2 * k_in if glu else k_in) and not (glu and norm_weight is not None)  # one prologue
    y = torch.empty(rows, n_out, device=x.device, dtype=x.dtype if residual is None else residual.dtype)
    block_n = 16 if n_out <= 4096 else 32
    _, _, linear, _ = _kernels()
    linear[(-(-n_out // block_n),)](
        x, weight, weight if bias is None else bias, weight if norm_weight is None else norm_weight,
        y if residual is None else residual, y, rows, n_out, k_in, x.stride(0), weight.stride(0),
        0 if residual is None else residual.stride(0), y.stride(0), eps, R_PAD=_next_pow2(rows), BLOCK_N=block_n,
        BLOCK_K=128, NORM=norm_weight is not None, GLU=glu, BIAS=bias is not None, RESID=residual is not None)
    return y


def expert_linear_reference(x, weights, chosen, coeffs=None, norm_weight=None, residual=None, eps: float = 1e-6,
                            glu: bool = False) -> torch.Tensor:
    """The twin of the `expert_linear` kernel: weights [E, N, K] stacked experts, chosen [R, top_k]
    each row's experts; x [R, K] with norm_weight (one input a row) or [R * top_k, 2K] with glu (one a
    choice). -> [R * top_k, N], or with coeffs [R, top_k]: [R, N], the choices' sum weighted by coeffs
    (+ residual)."""
    rows, top_k = chosen.shape
    out_dtype = x.dtype if residual is None else residual.dtype
    x = _projection_input(x, weights.dtype, norm_weight, eps, glu)
    if norm_weight is not None:
        x = x.repeat_interleave(top_k, dim=0)
    y = torch.einsum("cnk,ck->cn", weights[chosen.reshape(-1)].float(), x.float())
    if coeffs is None:
        return y.to(out_dtype)
    y = (y.view(rows, top_k, -1) * coeffs.float()[..., None]).sum(1)
    return (y if residual is None else y + residual.float()).to(out_dtype)


def triton_expert_linear(x, weights, chosen, coeffs=None, norm_weight=None, residual=None, eps: float = 1e-6,
                         glu: bool = False) -> torch.Tensor:
    """`expert_linear_reference`'s computation by the Triton kernel."""
    n_out, k_in = weights.shape[1:]
    rows, top_k = chosen.shape
    combine = coeffs is not None
    assert rows <= MAX_LINEAR_ROWS and x.stride(-1) == 1 and weights.stride(-1) == 1 and chosen.is_contiguous()
    assert (glu and norm_weight is None and x.shape == (rows * top_k, 2 * k_in)) or \
        (not glu and norm_weight is not None and x.shape == (rows, k_in))  # one prologue, as the layer uses them
    assert residual is None or combine
    y = torch.empty(rows if combine else rows * top_k, n_out, device=x.device,
                    dtype=x.dtype if residual is None else residual.dtype)
    coeffs = coeffs.contiguous() if combine else chosen
    block_n = 16 if n_out <= 4096 else 32
    *_, expert_linear = _kernels()
    expert_linear[(-(-n_out // block_n), rows)](
        x, weights, weights if norm_weight is None else norm_weight, y if residual is None else residual, y, chosen,
        coeffs, n_out, k_in, x.stride(0), weights.stride(0), weights.stride(1),
        0 if residual is None else residual.stride(0), y.stride(0), eps, TOP_K=top_k, BLOCK_N=block_n, BLOCK_K=128,
        NORM=norm_weight is not None, GLU=glu, COMBINE=combine, RESID=residual is not None)
    return y


def kernels_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels run here: a GPU with Triton, or the CPU under CPU_KERNEL."""
    return triton_available() and (device.type == "cuda" or (CPU_KERNEL and _interpreting()))


@torch.library.custom_op("cot_distill::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  norm_weight: Optional[torch.Tensor], residual: Optional[torch.Tensor], eps: float,
                  glu: bool) -> torch.Tensor:
    """A decode step's projection of a few rows with what surrounds it in one kernel: the RMSNorm
    before it (norm_weight), the SwiGLU product before it (glu), the residual add after it."""
    if kernels_run_on(x.device):
        return triton_linear(x, weight, bias, norm_weight, residual, eps, glu)
    return linear_reference(x, weight, bias, norm_weight, residual, eps, glu)


@decode_linear.register_fake
def _(x, weight, bias, norm_weight, residual, eps, glu):
    dtype = x.dtype if residual is None else residual.dtype
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)


@torch.library.custom_op("cot_distill::decode_expert_linear", mutates_args=())
def decode_expert_linear(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, coeffs: Optional[torch.Tensor],
                         norm_weight: Optional[torch.Tensor], residual: Optional[torch.Tensor], eps: float,
                         glu: bool) -> torch.Tensor:
    """A decode step's projection of a few rows by each row's chosen experts, in one kernel that reads
    only those experts' weights: the gate/up projections after the RMSNorm (norm_weight), or the down
    projections after the SwiGLU product (glu), weighted by the router (coeffs) and summed with the
    residual."""
    if kernels_run_on(x.device):
        return triton_expert_linear(x, weights, chosen, coeffs, norm_weight, residual, eps, glu)
    return expert_linear_reference(x, weights, chosen, coeffs, norm_weight, residual, eps, glu)


@decode_expert_linear.register_fake
def _(x, weights, chosen, coeffs, norm_weight, residual, eps, glu):
    rows = chosen.shape[0] if coeffs is not None else chosen.numel()
    return x.new_empty((rows, weights.shape[1]), dtype=x.dtype if residual is None else residual.dtype)


@functools.lru_cache(maxsize=None)
def kernel_check(device: str, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int,
                 window: Optional[int]) -> Optional[str]:
    """None when the Triton kernels run on `device` and compute their twins' results on random inputs
    (the attention on these heads, in one piece and several, a row at position 0, a shared prompt segment; the fused
    projections with each prologue and epilogue, and the MoE experts'); else why not, in a few words. Run once per shape by
    `--decode_attention auto` before it picks the kernels."""
    if not triton_available():
        return "Triton is not installed"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        for rows, kv_len, width in ((3, 100, 0), (3, 700, 0), (3, 300, 500)):  # width: a shared prompt segment
            def rand(*shape):
                return torch.randn(*shape, device=device, generator=gen).to(dtype)

            angles = torch.rand(rows, head_dim // 2, device=device, generator=gen) * 6
            cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
            q, k, v = rand(rows, n_heads, head_dim), rand(rows, n_kv, head_dim), rand(rows, n_kv, head_dim)
            caches = [rand(rows, n_kv, kv_len, head_dim) for _ in range(2)]
            positions = torch.tensor([kv_len - 1, kv_len // 2, 0], device=device)
            prompts = ()
            if width:  # rows with prompts of width, 100 and 0 tokens from two prompt rows
                lens = torch.tensor([width, 100, 0], device=device)
                prompts = (rand(2, n_kv, width, head_dim), rand(2, n_kv, width, head_dim),
                           torch.tensor([1, 0, 1], device=device), lens)
                positions = positions + lens
            want = reference(q.float(), k.float(), v.float(), cos.float(), sin.float(), *[c.float() for c in caches],
                             positions, window, kv_len, *[t.float() if t.is_floating_point() else t for t in prompts])
            got = triton_decode_attention(q, k, v, cos, sin, *caches, positions, window, kv_len, *prompts).float()
            err = float((got - want).norm() / want.norm())
            if not err < (1e-4 if dtype == torch.float32 else 3e-2):  # NaN fails too
                return f"its result differs from the torch twin's (relative error {err:.2g})"
        for rows, glu in ((1, False), (3, True)):  # the fused projections: norm + bias, SwiGLU + residual
            x = torch.randn(rows, 600 if glu else 300, device=device, generator=gen).to(dtype)
            weight = (torch.randn(200, 300, device=device, generator=gen) / 17).to(dtype)
            extra = dict(residual=torch.randn(rows, 200, device=device, generator=gen).to(dtype)) if glu else dict(
                bias=torch.randn(200, device=device, generator=gen).to(dtype),
                norm_weight=torch.rand(300, device=device, generator=gen).to(dtype))
            want = linear_reference(x.float(), weight.float(), **{k: t.float() for k, t in extra.items()}, glu=glu)
            got = triton_linear(x, weight, **extra, glu=glu).float()
            err = float((got - want).norm() / want.norm())
            if not err < (1e-4 if dtype == torch.float32 else 3e-2):
                return f"its projection differs from the torch twin's (relative error {err:.2g})"
        weights = (torch.randn(4, 200, 300, device=device, generator=gen) / 17).to(dtype)
        chosen = torch.tensor([[2, 0], [3, 1], [1, 2]], device=device)
        for extra in (dict(x=torch.randn(3, 300, device=device, generator=gen).to(dtype),  # MoE: gate/up, down
                           norm_weight=torch.rand(300, device=device, generator=gen).to(dtype)),
                      dict(x=torch.randn(6, 600, device=device, generator=gen).to(dtype), glu=True,
                           coeffs=torch.rand(3, 2, device=device, generator=gen),
                           residual=torch.randn(3, 200, device=device, generator=gen).to(dtype))):
            want = expert_linear_reference(weights=weights.float(), chosen=chosen, **{
                k: t.float() if isinstance(t, torch.Tensor) else t for k, t in extra.items()})
            got = triton_expert_linear(weights=weights, chosen=chosen, **extra).float()
            err = float((got - want).norm() / want.norm())
            if not err < (1e-4 if dtype == torch.float32 else 3e-2):
                return f"its expert projection differs from the torch twin's (relative error {err:.2g})"
    except Exception as e:  # a Triton or driver error: the dense path still works
        return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return None


@torch.library.custom_op("cot_distill::fused_decode_attention", mutates_args=("k_cache", "v_cache"))
def fused_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                           window: Optional[int], kv_len: int, prompt_k: Optional[torch.Tensor] = None,
                           prompt_v: Optional[torch.Tensor] = None, prompt_of: Optional[torch.Tensor] = None,
                           prompt_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One operation for torch.compile (it neither traces nor copies the cache): the Triton kernel on
    a GPU with Triton (and on the CPU with CPU_KERNEL, interpreted), else the torch twin."""
    run = triton_decode_attention if kernels_run_on(q.device) else reference
    return run(q, k, v, cos, sin, k_cache, v_cache, positions, window, kv_len, prompt_k, prompt_v, prompt_of,
               prompt_len)


@fused_decode_attention.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, positions, window, kv_len, prompt_k=None, prompt_v=None, prompt_of=None,
      prompt_len=None):
    return torch.empty_like(q)
