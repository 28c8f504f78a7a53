"""Training-step throughput, MFU and peak memory: this engine's trainer vs HF transformers (+ peft for
LoRA), same random model, batch and device, each side in its own process (so peak memory is its
own). Modes: full fine-tuning, LoRA, and an MCC-KD step (2 rationales per question, CE + the
symmetric KL of their answer-span predictions; HF computes the same loss from its full logits).

Ours runs the real training step (engine.train.trainer.Trainer._optimizer_step: chunked head loss,
regional compile where on, fused AdamW on CUDA, TP-aware clipping). MFU counts useful model FLOPs
per token, recomputation not counted: full 6N + 12·L·d·T, LoRA 4N + 12·L·d·T (frozen weights get no
weight gradients), N the parameters in matmuls (the body, plus the head for the fraction of
positions that carry a label: --prompt_fraction; the embedding lookup not),
over --peak_tflops (default: 989 dense bf16 on an H100/H200; on other devices the rate of a
large matmul measured in the same run).

  python bench/train_step.py [--modes full,lora,mcc] [--dim 512] [--n_layers 4] [--seq_len 256] [--batch 4]
                             [--lora_rank 16] [--dtype fp32|bf16] [--device cpu|cuda] [--steps 5]
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
from engine.train.task import Task  # noqa: E402  (after the path: the bench runs from anywhere)

TARGETS = "wq,wk,wv,wo,w1,w2,w3"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def _batch(vocab: int, batch: int, seq_len: int, mode: str):
    """Token ids [rows, seq_len]; for mcc, rows pair up (two rationales of a question) and each pair
    compares its last 3 positions (an answer span)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g)
    pairs = [(r, list(range(seq_len - 4, seq_len - 1)), r + 1, list(range(seq_len - 4, seq_len - 1)))
             for r in range(0, batch - 1, 2)] if mode == "mcc" else []
    return x, pairs


class _FixedTask(Task):
    """One fixed batch, run through the engine's own task losses (engine/distill/)."""

    def __init__(self, x, pairs, mode, device, prompt: int):
        import torch

        from engine.text.sequences import IGNORE
        from engine.train.task import make_batch

        labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], IGNORE)], dim=1)  # the next token
        labels[:, :max(prompt - 1, 0)] = IGNORE  # no loss on predicting the prompt
        self.mode, self.temperature = mode, 1.0
        self.weights = {"ce": 1.0, "kl": 0.1} if mode == "mcc" else {"ce": 1.0}
        counts = {"ce": float((labels != IGNORE).sum()), "kl": float(len(pairs))}
        self.batch = make_batch(x, labels, device, counts, x.numel(), {"pairs": pairs})
        self.rows = x.shape[0]

    @property
    def num_examples(self):
        return self.rows

    def lengths(self, epoch):
        return [self.batch.inputs.shape[1]] * self.rows

    def micro_batch(self, positions, epoch):
        return self.batch

    def loss_sums(self, model, batch):
        from engine.distill.mcc.task import MCCTask
        from engine.distill.sft import SFTTask

        return (MCCTask if self.mode == "mcc" else SFTTask).loss_sums(self, model, batch)


def run_side(side: str, hf_dir: str, native_dir: str, seq_len: int, batch: int, steps: int, mode: str,
             lora_rank: int, dtype: str, device: str, compile_mode: str, prompt: int) -> dict:
    import torch

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    lora = mode == "lora"
    if side == "ours":
        from engine.runtime import distributed
        from engine.train.config import TrainConfig
        from engine.train.launch import build_model
        from engine.train.trainer import Trainer

        info = distributed.setup(1, device=device)
        model, _ = build_model(native_dir, None, lora_rank if lora else -1, None, 0.0, TARGETS, dt, info)
        x, pairs = _batch(model.args.vocab_size, batch, seq_len, mode)
        task = _FixedTask(x, pairs, mode, info.device, prompt)
        cfg = TrainConfig(save_dir=tempfile.mkdtemp(), max_batch_size=batch, max_steps=steps + 2, lr=1e-5,
                          use_bfloat16=dtype == "bf16", use_float16=dtype == "fp16",
                          compile={"auto": None, "True": True, "False": False}[str(compile_mode)], progress=False,
                          plot=False)
        trainer = Trainer(model, task, cfg, info)

        def step():
            return trainer._optimizer_step([list(range(batch))])["loss"]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dt if lora else torch.float32).to(device)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=HF_TARGETS))
            for n, p in model.named_parameters():  # LoRA weights fp32, as ours
                if "lora_" in n:
                    p.data = p.data.float()
        model.train()
        x, pairs = _batch(model.config.vocab_size, batch, seq_len, mode)
        x = x.to(device)
        hf_labels = x.clone()
        hf_labels[:, :prompt] = -100  # HF shifts inside: no loss on predicting the prompt
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        autocast = torch.autocast(device_type=device, dtype=dt, enabled=dt != torch.float32)

        def step():
            with autocast:
                out = model(input_ids=x, labels=hf_labels)
                loss = out.loss
                if pairs:  # MCC-KD written the plain way: from the full logits
                    ra = [a for a, _, _, _ in pairs]
                    rb = [b for _, _, b, _ in pairs]
                    span = pairs[0][1]
                    la = torch.log_softmax(out.logits[ra][:, span].float(), -1)
                    lb = torch.log_softmax(out.logits[rb][:, span].float(), -1)
                    kl = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1)).mean()
                    loss = loss + 0.1 * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    losses = [float(step()), float(step())]  # warm-up (compilation, allocator, cuBLAS)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        last = step()
    losses.append(float(last))  # reading it waits for the device
    elapsed = time.perf_counter() - start
    return {"side": side, "tokens_per_s": batch * seq_len * steps / elapsed, "step_s": elapsed / steps,
            "peak_mb": _peak_bytes(device) / 2 ** 20, "first_loss": losses[0]}


def model_flops_per_token(dim, n_layers, n_heads, n_kv_heads, vocab, seq_len, lora: bool,
                          labelled: float = 1.0) -> float:
    """Useful FLOPs per token: the head counts only for the `labelled` fraction of positions (a
    prompt position's logits feed no loss, whoever computes them)."""
    head_dim = dim // n_heads
    hidden = int(dim * 8 / 3) // 64 * 64
    per_layer = dim * n_heads * head_dim * 2 + dim * n_kv_heads * head_dim * 2 + 3 * dim * hidden
    n_matmul = n_layers * per_layer + vocab * dim * labelled
    return (4 if lora else 6) * n_matmul + 12 * n_layers * dim * seq_len


def peak_flops(device: str, dtype: str) -> tuple:
    """(FLOP/s, how it was obtained)."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        if ("H100" in name or "H200" in name) and dtype in ("bf16", "fp16"):
            return 989e12, f"{name} dense {dtype} peak, 989 TFLOP/s"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype if device == "cuda" else "fp32"]
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dt)
    a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    rate = 2 * n ** 3 * reps / (time.perf_counter() - t0)
    return rate, f"measured {n}x{n} {str(dt).replace('torch.', '')} matmul rate, {rate / 1e12:.3f} TFLOP/s"


def main(modes: str = "full,lora,mcc", dim: int = 512, n_layers: int = 4, n_heads: int = 8, n_kv_heads: int = 4,
         vocab: int = 32000, seq_len: int = 256, batch: int = 4, steps: int = 5, lora_rank: int = 16,
         dtype: str = "fp32", device: str = None, threads: int = 0, compile: str = "auto", peak_tflops: float = 0,  # noqa: A002 (--compile)
         sides: str = "ours,hf", prompt_fraction: float = 0.0):
    """Print tokens/s, MFU and peak memory of one training step for both engines, and their ratios.

    Args:
        modes: comma-separated: full (full fine-tuning), lora (LoRA, frozen base in --dtype), mcc (MCC-KD, full).
        dim, n_layers, n_heads, n_kv_heads, vocab: the random LLaMA model's shape.
        seq_len, batch: the training batch (mcc: batch/2 questions x 2 rationales).
        steps: measured steps (after two warm-up steps).
        lora_rank: LoRA rank of the lora mode.
        dtype: fp32, bf16 or fp16 compute.
        device: cpu or cuda (default: cuda when available).
        threads: torch threads per process (0: torch's default).
        compile: ours: auto (on a GPU), True or False.
        peak_tflops: the peak for MFU (0: see the module docstring).
        sides: ours,hf or one of them (e.g. ours alone to check what fits in memory).
        prompt_fraction: the first part of every sequence is a prompt with no loss, as in real training data.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    peak, peak_how = (peak_tflops * 1e12, f"given, {peak_tflops} TFLOP/s") if peak_tflops else peak_flops(device, dtype)
    print(f"MFU = tokens/s x model FLOPs per token / peak; peak: {peak_how}", flush=True)
    summary = {"device": device, "dtype": dtype, "dim": dim, "n_layers": n_layers, "seq_len": seq_len, "batch": batch,
               "peak_flops": peak, "peak": peak_how, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM

        from engine import checkpoint as ck

        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(_hf_config(dim, n_layers, n_heads, n_kv_heads, vocab, seq_len),
                                              dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
        hf.save_pretrained(os.path.join(tmp, "hf"))
        del hf
        ck.write_native(ck.open_checkpoint(os.path.join(tmp, "hf")), os.path.join(tmp, "native"), 1, progress=False)
        for mode in modes.split(",") if isinstance(modes, str) else modes:
            results = {}
            for side in sides.split(",") if isinstance(sides, str) else sides:
                cmd = [sys.executable, __file__, "--_side", side, "--_hf_dir", os.path.join(tmp, "hf"),
                       "--_native_dir", os.path.join(tmp, "native"), "--seq_len", str(seq_len), "--batch", str(batch),
                       "--steps", str(steps), "--mode", mode, "--lora_rank", str(lora_rank), "--dtype", dtype,
                       "--device", device, "--compile", str(compile), "--prompt", str(int(prompt_fraction * seq_len))]
                paths = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # keep packages installed on a path
                if threads:
                    env["OMP_NUM_THREADS"] = str(threads)
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0 and "OutOfMemoryError" in out.stderr:
                    results[side] = {"side": side, "out_of_memory": True}
                    continue
                if out.returncode != 0:
                    raise SystemExit(f"{mode} {side} failed:\n{out.stderr[-3000:]}")
                results[side] = json.loads(out.stdout.strip().splitlines()[-1])
            labelled = 1.0 - int(prompt_fraction * seq_len) / seq_len
            flops = model_flops_per_token(dim, n_layers, n_heads, n_kv_heads, vocab, seq_len, mode == "lora", labelled)
            name = {"full": "full fine-tuning", "lora": f"LoRA r={lora_rank}", "mcc": "MCC-KD (full)"}[mode]
            print(f"train step, {name}, {dtype}, {device}, dim={dim} layers={n_layers} batch={batch}x{seq_len}"
                  + (f", prompt {prompt_fraction:.0%} of each sequence" if prompt_fraction else ""))
            for side, r in results.items():
                if r.get("out_of_memory"):
                    print(f"  {side:4s}: out of memory")
                    continue
                r["mfu"] = r["tokens_per_s"] * flops / peak
                print(f"  {side:4s}: {r['tokens_per_s']:9.0f} tokens/s  MFU {r['mfu']:6.1%}  "
                      f"peak {r['peak_mb']:8.0f} MB  (first loss {r['first_loss']:.4f})")
            o, h = results.get("ours", {}), results.get("hf", {})
            if "tokens_per_s" in o and "tokens_per_s" in h:
                print(f"  ratio ours/HF: speed x{o['tokens_per_s'] / h['tokens_per_s']:.2f}, "
                      f"peak memory x{o['peak_mb'] / h['peak_mb']:.2f}", flush=True)
            summary["modes"][mode] = {**results, "flops_per_token": flops}
    print(json.dumps(summary))


if __name__ == "__main__":
    if "--_side" in sys.argv:
        import argparse

        ap = argparse.ArgumentParser()
        for flag in ("_side", "_hf_dir", "_native_dir", "dtype", "device", "mode", "compile"):
            ap.add_argument("--" + flag)
        for flag in ("seq_len", "batch", "steps", "lora_rank", "prompt"):
            ap.add_argument("--" + flag, type=int)
        a = ap.parse_args()
        print(json.dumps(run_side(a._side, a._hf_dir, a._native_dir, a.seq_len, a.batch, a.steps, a.mode, a.lora_rank,
                                  a.dtype, a.device, a.compile, a.prompt)))
    else:
        import fire

        fire.Fire(main)
