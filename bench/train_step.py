"""Training-step throughput and peak memory: this engine vs HF transformers (+ peft for LoRA), same
random model, batch and device. Each side runs in its own process so peak memory is its own.

  python bench/train_step.py [--dim 512] [--n_layers 4] [--seq_len 256] [--batch 4] [--lora_rank 0]
                             [--dtype fp32|bf16] [--device cpu|cuda] [--steps 5]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _hf_config(dim, n_layers, n_heads, n_kv_heads, vocab, seq_len):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 64 * 64, num_hidden_layers=n_layers,
                       num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                       max_position_embeddings=max(seq_len, 2048))


def _peak_bytes(device):
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_side(side: str, hf_dir: str, native_dir: str, seq_len: int, batch: int, steps: int, lora_rank: int,
             dtype: str, device: str) -> dict:
    import torch

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    autocast = torch.autocast(device_type=device, dtype=dt) if dt != torch.float32 else None
    if side == "ours":
        from engine import distributed
        from engine.data import IGNORE
        from engine.launch import build_model
        from engine.objectives import token_cross_entropy

        info = distributed.setup(1, device=device)
        model, _ = build_model(native_dir, None, lora_rank if lora_rank > 0 else -1, None, 0.0,
                               "wq,wk,wv,wo,w1,w2,w3", dt, info)

        def loss_fn(x, y):
            return token_cross_entropy(model(x, gather=False), y) / (y != IGNORE).sum()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32 if lora_rank <= 0 else dt)
        model.to(device)
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
            for n, p in model.named_parameters():  # LoRA weights fp32, as ours
                if "lora_" in n:
                    p.data = p.data.float()
        model.train()

        def loss_fn(x, y):
            return model(input_ids=x, labels=y).loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size if side == "hf" else model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    labels = x.clone()
    if side == "ours":  # ours takes labels already shifted to the next token; HF shifts inside
        labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)

    def step():
        if autocast:
            with autocast:
                loss = loss_fn(x, labels)
        else:
            loss = loss_fn(x, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step()]  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"side": side, "tokens_per_s": batch * seq_len * steps / elapsed, "step_s": elapsed / steps,
            "peak_mb": _peak_bytes(device) / 2 ** 20, "first_loss": losses[0]}


def main(dim: int = 512, n_layers: int = 4, n_heads: int = 8, n_kv_heads: int = 4, vocab: int = 32000,
         seq_len: int = 256, batch: int = 4, steps: int = 5, lora_rank: int = 0, dtype: str = "fp32",
         device: str = None, threads: int = 0):
    """Print tokens/s and peak memory of one training step for both engines, and their ratio.

    Args:
        dim, n_layers, n_heads, n_kv_heads, vocab: the random LLaMA model's shape.
        seq_len, batch: the training batch.
        steps: measured steps (after one warm-up step).
        lora_rank: > 0 benchmarks LoRA (ours vs HF + peft) with a frozen base in --dtype.
        dtype: fp32, bf16 or fp16 compute.
        device: cpu or cuda (default: cuda when available).
        threads: torch threads per process (0: torch's default).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM

        from engine import checkpoint as ck

        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(_hf_config(dim, n_layers, n_heads, n_kv_heads, vocab, seq_len))
        hf.save_pretrained(os.path.join(tmp, "hf"))
        del hf
        ck.write_native(ck.open_checkpoint(os.path.join(tmp, "hf")), os.path.join(tmp, "native"), 1, progress=False)
        results = {}
        for side in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--_side", side, "--_hf_dir", os.path.join(tmp, "hf"),
                   "--_native_dir", os.path.join(tmp, "native"), "--seq_len", str(seq_len), "--batch", str(batch),
                   "--steps", str(steps), "--lora_rank", str(lora_rank), "--dtype", dtype, "--device", device]
            paths = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # keep packages installed on a path
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    o, h = results["ours"], results["hf"]
    mode = f"LoRA r={lora_rank}" if lora_rank > 0 else "full fine-tuning"
    print(f"train step, {mode}, {dtype}, {device}, dim={dim} layers={n_layers} batch={batch}x{seq_len}")
    print(f"  ours: {o['tokens_per_s']:9.0f} tokens/s  peak {o['peak_mb']:8.0f} MB  (first loss {o['first_loss']:.4f})")
    print(f"  HF  : {h['tokens_per_s']:9.0f} tokens/s  peak {h['peak_mb']:8.0f} MB  (first loss {h['first_loss']:.4f})")
    print(f"  ratio ours/HF: speed x{o['tokens_per_s'] / h['tokens_per_s']:.2f}, peak memory x{o['peak_mb'] / h['peak_mb']:.2f}")
    print(json.dumps({"ours": o, "hf": h}))


if __name__ == "__main__":
    if "--_side" in sys.argv:
        import argparse

        ap = argparse.ArgumentParser()
        for flag in ("_side", "_hf_dir", "_native_dir", "dtype", "device"):
            ap.add_argument("--" + flag)
        for flag in ("seq_len", "batch", "steps", "lora_rank"):
            ap.add_argument("--" + flag, type=int)
        a = ap.parse_args()
        print(json.dumps(run_side(a._side, a._hf_dir, a._native_dir, a.seq_len, a.batch, a.steps, a.lora_rank,
                                  a.dtype, a.device)))
    else:
        import fire

        fire.Fire(main)
