"""Greedy generation throughput: this engine vs HF transformers `generate()`, same random model,
prompts and device, with a check that both produce the same tokens.

  python bench/generate.py [--batches 1,64,384] [--dim 512] [--n_layers 4] [--new_tokens 32] [--device cuda]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(batches="1,64,384", dim: int = 512, n_layers: int = 4, n_heads: int = 8, n_kv_heads: int = 4,
         vocab: int = 32000, min_prompt: int = 16, max_prompt: int = 96, new_tokens: int = 32, dtype: str = "fp32",
         device: str = None, seed: int = 0):
    """Print tokens/s of both engines at each batch size, their ratio, and whether the tokens agree.

    Args:
        batches: comma-separated batch sizes (a size that runs out of memory is reported and skipped).
        dim, n_layers, n_heads, n_kv_heads, vocab: the random LLaMA model's shape.
        min_prompt, max_prompt: prompt lengths are drawn uniformly between these.
        new_tokens: tokens generated per prompt (no early stop, so both sides do the same work).
        dtype: fp32, bf16 or fp16.
        device: cpu or cuda (default: cuda when available).
        seed: prompt and weight seed.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine import checkpoint as ck
    from engine import distributed
    from engine.generation import SamplingParams, generate

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    sizes = [int(b) for b in str(batches).split(",")] if not isinstance(batches, (list, tuple)) else list(batches)
    info = distributed.setup(1, device=device)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 64 * 64, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_prompt + new_tokens + 8)
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dt).to(device).eval()
        ours = ck.load_model(tmp, dtype=dt, device=info.device).eval()
    g = torch.Generator().manual_seed(seed)
    results = []
    for bsz in sizes:
        lens = torch.randint(min_prompt, max_prompt + 1, (bsz,), generator=g).tolist()
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
        try:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            mine = generate(ours, prompts, SamplingParams(max_new_tokens=new_tokens), stop_ids=[], batch_size=bsz)
            if device == "cuda":
                torch.cuda.synchronize()
            t_ours = time.perf_counter() - t0
            width = max(lens)
            ids = torch.zeros(bsz, width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, p in enumerate(prompts):
                ids[b, width - len(p):] = torch.tensor(p)
                mask[b, width - len(p):] = 1
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
            if device == "cuda":
                torch.cuda.synchronize()
            t_hf = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            print(f"batch {bsz}: out of memory, skipped")
            continue
        theirs = out[:, width:].tolist()
        same = sum(a == b for a, b in zip(mine, theirs))
        n_tok = bsz * new_tokens
        row = {"batch": bsz, "ours_tokens_per_s": n_tok / t_ours, "hf_tokens_per_s": n_tok / t_hf,
               "ratio": t_hf / t_ours, "identical_sequences": f"{same}/{bsz}"}
        results.append(row)
        print(f"batch {bsz:4d}: ours {row['ours_tokens_per_s']:9.1f} tok/s  HF {row['hf_tokens_per_s']:9.1f} tok/s  "
              f"ratio x{row['ratio']:.2f}  identical {row['identical_sequences']}", flush=True)
    print(json.dumps({"device": device, "dtype": dtype, "dim": dim, "n_layers": n_layers, "results": results}))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
