"""The sampling of one decode step, --top_p alone (the vocabulary sorted) against --top_p_bound B
(torch.topk of B, then the nucleus among them) and --top_k, on the same logits in the same run: ms
per call, the ratio to the full sort, and how many rows the bound cut (their B most likely tokens
held less than top_p) - on logits drawn with a given spread, so the cut fraction says what the
spread makes it, not what a real model's distributions do.

  python bench/sampling.py [--rows 1,64,384] [--vocab 32000] [--bound 1024] [--device cuda] [--logits bf16]
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _ms_per_call(fn, device: str, repeat: int) -> float:
    import torch

    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat * 1e3


def main(rows="1,64,384", vocab: int = 32000, bound: int = 1024, top_p: float = 0.95, top_k: int = 50,
         temperature: float = 0.8, spread: float = 4.0, repeat: int = 20, device: str = None, seed: int = 0,
         logits: str = "fp32"):
    """Print one JSON line per row count: ms per call of each way to sample, ratios, rows cut.

    Args:
        rows: comma-separated row counts (decode slots).
        vocab: vocabulary size.
        bound: --top_p_bound.
        top_p: --top_p.
        top_k: --top_k of the third way (with top_p).
        temperature: --temperature.
        spread: standard deviation of the random logits (larger: more peaked distributions).
        repeat: calls timed per way.
        device: cpu or cuda (default: cuda when available).
        seed: logits seed.
        logits: fp32, or bf16: rounded to bf16 as a bf16 model's are (equal probabilities, whose order the fast ways must keep).
    """
    import torch

    from engine.infer.generation import SamplingParams, choose_tokens

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if logits not in ("fp32", "bf16"):
        raise SystemExit(f"--logits must be fp32 or bf16, not {logits!r}")
    rounding = torch.bfloat16 if logits == "bf16" else torch.float32
    sizes = [int(r) for r in str(rows).split(",")] if not isinstance(rows, (list, tuple)) else list(rows)
    gen = torch.Generator().manual_seed(seed)
    for n in sizes:
        scores = (torch.randn(n, vocab, generator=gen) * spread).to(rounding).float().to(device)
        seeds = torch.randint(0, 1 << 31, (n,), generator=gen).to(device)
        draws = torch.zeros(n, dtype=torch.long, device=device)
        short = torch.zeros(n, dtype=torch.bool, device=device)
        ways = {"full_sort": SamplingParams(temperature=temperature, top_p=top_p),
                "top_p_bound": SamplingParams(temperature=temperature, top_p=top_p, top_p_bound=bound),
                "top_k": SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)}
        ms = {name: _ms_per_call(lambda p=p: choose_tokens(scores, p, seeds, draws), device, repeat)
              for name, p in ways.items()}
        exact = choose_tokens(scores, ways["full_sort"], seeds, draws)
        bounded = choose_tokens(scores, ways["top_p_bound"], seeds, draws, short)
        print(json.dumps({"rows": n, "vocab": vocab, "bound": bound, "device": device, "logits": logits,
                          **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                          "bound_speedup": round(ms["full_sort"] / ms["top_p_bound"], 2),
                          "top_k_speedup": round(ms["full_sort"] / ms["top_k"], 2),
                          "rows_cut": int(short.sum()),
                          "same_token_where_not_cut": bool(torch.equal(exact[~short], bounded[~short]))}),
              flush=True)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
