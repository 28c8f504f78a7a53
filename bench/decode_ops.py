"""Operations one batch-1 decode step dispatches, --decode_attention dense against fused: the CPU's
view of what the fused kernels change on a GPU, where each dispatched operation is (at least) one
kernel launch and a batch-1 step is bound by those launches (issue 22, item 5).

The step is the static-shape forward a CUDA graph captures (one token, KV length 128), on a random
LLaMA of the bench model's layer count; the fused path runs the Triton kernels themselves through
Triton's CPU interpreter (TRITON_INTERPRET=1, set here before anything imports triton). Counted with
a dispatch mode: every operation that computes (views, which launch nothing, not counted). Eager
PyTorch on both sides: inductor's fusions on a GPU shrink the dense count further (BENCHMARKS.md).

  python bench/decode_ops.py [--n_layers 16] [--dim 256] [--rows 1]
  python bench/decode_ops.py --n_experts 8 [--top_k 2] [--time_rows 64]   # a Mixtral; its MoE routes too
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _no_kernel():
    import torch

    return {torch.ops.aten._unsafe_view.default}  # a reshape's view, though not flagged as one


def count_step_ops(model, rows: int, kv_len: int) -> Counter:
    """Computing operations of one decode forward of `rows` rows at position kv_len / 2."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    ops, _NO_KERNEL = Counter(), _no_kernel()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func not in _NO_KERNEL:
                ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    step = _decode_step(model, rows, kv_len)
    with torch.no_grad(), model.static_shapes(), Count():
        step()
    return ops


def _decode_step(model, rows: int, kv_len: int):
    """One decode forward of `rows` rows at position kv_len / 2 on a fresh cache, as a call."""
    import functools

    import torch

    tokens = torch.ones(rows, 1, dtype=torch.long)
    positions = torch.full((rows, 1), kv_len // 2, dtype=torch.long)
    return functools.partial(model, tokens, positions=positions, cache=model.new_cache(rows, kv_len), kv_len=kv_len)


def step_ms(model, rows: int, kv_len: int, repeats: int = 5) -> float:
    """Mean wall-clock ms of the static-shape decode forward of `rows` rows (after one warm-up)."""
    import time

    import torch

    step = _decode_step(model, rows, kv_len)
    with torch.no_grad(), model.static_shapes():
        step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
    return (time.perf_counter() - start) / repeats * 1e3


def moe_routes(model, rows: int, kv_len: int, time_rows: int) -> dict:
    """The static MoE's two routes, grouped matmuls (MoE.forward's default where torch's grouped matmul
    runs without the host) and every expert on every row: operations per step at `rows` rows, and
    (time_rows > 0) ms per static step at time_rows rows, eager on this CPU."""
    from models import transformer

    routes = {}
    real = transformer.grouped_matmul_runs_on
    for route, runs_on in (("grouped", real), ("every_expert", lambda *weights: False)):
        transformer.grouped_matmul_runs_on = runs_on
        try:
            routes[f"{route}_ops"] = sum(count_step_ops(model, rows, kv_len).values())
            if time_rows:
                routes[f"{route}_ms_at_{time_rows}_rows"] = step_ms(model, time_rows, kv_len)
        finally:
            transformer.grouped_matmul_runs_on = real
    return routes


def main(n_layers: int = 16, dim: int = 256, n_heads: int = 4, n_kv_heads: int = 2, rows: int = 1,
         kv_len: int = 128, n_experts: int = 0, top_k: int = 2, time_rows: int = 0):
    """Print the operations per step of each path, their ratio, and the counts by operation.

    Args:
        n_layers, dim, n_heads, n_kv_heads: the random LLaMA's shape (layers matter; widths do not).
        rows: decode rows (the five-kernel layer takes at most 4).
        kv_len: the KV length the step reads.
        n_experts, top_k: a Mixtral instead, its MoE layers of n_experts experts, top_k a token (0: LLaMA).
        time_rows: with n_experts, also time the dense static step at this many rows, by each MoE route.
    """
    import torch

    from engine.runtime import distributed
    from models import decode_kernels
    from models.registry import model_args_for
    from models.transformer import Transformer

    if not decode_kernels.triton_available():
        raise SystemExit("bench/decode_ops.py needs triton (pip install triton) to interpret the fused kernels")
    distributed.setup(1, device="cpu")
    torch.manual_seed(0)
    experts = dict(n_experts=n_experts, n_experts_per_tok=top_k, hidden_dim=4 * dim) if n_experts else {}
    args = model_args_for("mixtral-8x7b-instruct-v0.1" if n_experts else "llama-2-7b", dim=dim, n_layers=n_layers,
                          n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=512, max_seq_len=2 * kv_len, **experts)
    model = Transformer(args).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.fuse_projections()
    decode_kernels.CPU_KERNEL = True  # this process only: the kernels interpreted
    counts = {}
    for kind in ("dense", "fused"):
        model.decode_attention(kind)
        counts[kind] = count_step_ops(model, rows, kv_len)
    dense, fused = sum(counts["dense"].values()), sum(counts["fused"].values())
    model_name = f"MoE of {n_experts} experts, top {top_k}" if n_experts else "dense MLP"
    print(f"operations per decode step ({n_layers} layers, {model_name}, {rows} row(s), KV length {kv_len}): "
          f"dense {dense} ({dense / n_layers:.1f} a layer), fused {fused} ({fused / n_layers:.1f} a layer), "
          f"x{dense / fused:.2f} fewer")
    routes = {}
    if n_experts:
        model.decode_attention("dense")
        routes = moe_routes(model, rows, kv_len, time_rows)
        print("the dense step's MoE routes: " + ", ".join(f"{k} {v:.4g}" for k, v in routes.items()))
    print(json.dumps({"n_layers": n_layers, "n_experts": n_experts, "rows": rows, "kv_len": kv_len, "dense_ops": dense, "fused_ops": fused,
                      **routes, "by_op": {k: dict(v.most_common()) for k, v in counts.items()}}))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
