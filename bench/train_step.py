"""Training-step throughput, MFU and peak memory: this engine's trainer vs HF transformers (+ peft for
LoRA), same random model, batches and device, each side in its own process (so peak memory is its
own). Modes: full fine-tuning, LoRA, and an MCC-KD step (2 rationales per question, CE + the
symmetric KL of their answer-span predictions; HF computes the same loss from its full logits).

The batches have the lengths of real training data by default (--lengths svamp, bench/lengths.py:
the SVAMP teacher rationales under the LLaMA-2 tokenizer, batched and bucketed as the trainer does,
every row its own prompt without loss and its rationale, cut at --seq_len, padded to the longest
row), so each step has another shape, as in training: a recompile or a graph break on a new length
shows in the numbers. --lengths fixed: every row --seq_len tokens, the first --prompt_fraction of
them a prompt. Tokens/s counts real (unpadded) tokens; the first two steps (two different lengths)
are the warm-up.

Ours runs the real training step (engine.train.trainer.Trainer._optimizer_step: chunked head loss,
regional compile where on, fused AdamW on CUDA, TP-aware clipping). MFU counts useful model FLOPs
per token, recomputation and padding not counted: full 6N + 12·L·d·T, LoRA 4N + 12·L·d·T (frozen
weights get no weight gradients), T the row's length, N the parameters in matmuls (the body, plus
the head for the fraction of positions that carry a label; the embedding lookup not),
over --peak_tflops (default: 989 dense bf16 on an H100/H200; on other devices the rate of a
large matmul measured in the same run).

  python bench/train_step.py [--modes full,lora,mcc] [--dim 512] [--n_layers 4] [--seq_len 256] [--batch 4]
                             [--lengths svamp|fixed] [--lora_rank 16] [--dtype fp32|bf16] [--device cpu|cuda]
                             [--steps 5]
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


def step_shapes(lengths: str, batch: int, seq_len: int, n: int, mode: str, prompt: int) -> tuple:
    """n batches of rows (prompt tokens, sequence tokens), and where their lengths came from. mcc: rows
    pair up (two rationales of a question, side by side). The first two batches have different widths
    (the warm-up sees a second shape, as a compiled step must)."""
    if lengths == "fixed":
        return [[(prompt, seq_len)] * batch for _ in range(n)], f"fixed {batch}x{seq_len}"
    from bench.lengths import question_lengths, training_batches

    questions, source = question_lengths()
    out = training_batches(questions, batch, seq_len, n + 8, pairs=mode == "mcc")
    width = [max(length for _, length in b) for b in out]
    other = next((i for i in range(1, len(out)) if width[i] != width[0]), 1)
    out.insert(1, out.pop(other))
    return out[:n], source


def _batch(vocab: int, rows, mode: str, seed: int):
    """Token ids [rows, longest] right-padded with 0, the next-token labels of every row's response
    (positions prompt-1 .. length-2), and for mcc the answer-span pairs: rows 2q and 2q+1 compare
    the predictions of their last (up to) 3 tokens."""
    import torch

    from engine.text.sequences import IGNORE

    g = torch.Generator().manual_seed(seed)
    width = max(length for _, length in rows)
    x = torch.randint(0, vocab, (len(rows), width), generator=g)
    labels = torch.full_like(x, IGNORE)
    for b, (p, length) in enumerate(rows):
        x[b, length:] = 0
        start = max(p - 1, 0)
        labels[b, start:length - 1] = x[b, start + 1:length]
    pairs = []
    if mode == "mcc":
        for a in range(0, len(rows) - 1, 2):
            (pa, la), (pb, lb) = rows[a], rows[a + 1]
            w = max(1, min(3, la - pa, lb - pb))
            pairs.append((a, list(range(la - 1 - w, la - 1)), a + 1, list(range(lb - 1 - w, lb - 1))))
    return x, labels, pairs


class _BenchTask(Task):
    """The bench's batches, one per step (`current`), run through the engine's own task losses (engine/distill/)."""

    def __init__(self, steps, mode, device, vocab: int):
        from engine.text.sequences import IGNORE
        from engine.train.task import make_batch

        self.mode, self.temperature, self.current = mode, 1.0, 0
        self.weights = {"ce": 1.0, "kl": 0.1} if mode == "mcc" else {"ce": 1.0}
        self.batches = []
        for i, rows in enumerate(steps):
            x, labels, pairs = _batch(vocab, rows, mode, i)
            counts = {"ce": float((labels != IGNORE).sum()), "kl": float(len(pairs))}
            n_tokens = sum(length for _, length in rows)
            self.batches.append(make_batch(x, labels, device, counts, n_tokens, {"pairs": pairs}))
        self.rows = len(steps[0])

    @property
    def num_examples(self):
        return self.rows

    def lengths(self, epoch):
        return [self.batches[0].inputs.shape[1]] * self.num_examples

    def micro_batch(self, positions, epoch):
        return self.batches[self.current]

    def loss_sums(self, model, batch):
        from engine.distill.mcc.task import MCCTask
        from engine.distill.sft import SFTTask

        return (MCCTask if self.mode == "mcc" else SFTTask).loss_sums(self, model, batch)


def run_side(side: str, hf_dir: str, native_dir: str, shapes: list, mode: str, lora_rank: int, dtype: str,
             device: str, compile_mode: str) -> dict:
    """Two warm-up steps on shapes[0] and shapes[1], then one timed step on each of the others."""
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
        task = _BenchTask(shapes, mode, info.device, model.args.vocab_size)
        batch = task.num_examples
        cfg = TrainConfig(save_dir=tempfile.mkdtemp(), max_batch_size=batch, max_steps=len(shapes), lr=1e-5,
                          use_bfloat16=dtype == "bf16", use_float16=dtype == "fp16",
                          compile={"auto": None, "True": True, "False": False}[str(compile_mode)], progress=False,
                          plot=False)
        trainer = Trainer(model, task, cfg, info)

        def step(i):
            task.current = i
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
        batches = []
        for i, rows in enumerate(shapes):
            x, _, pairs = _batch(model.config.vocab_size, rows, mode, i)
            hf_labels = torch.full_like(x, -100)  # HF shifts inside: label t is predicted at t - 1
            for b, (p, length) in enumerate(rows):
                hf_labels[b, p:length] = x[b, p:length]
            batches.append((x.to(device), hf_labels.to(device), pairs))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        autocast = torch.autocast(device_type=device, dtype=dt, enabled=dt != torch.float32)

        def step(i):
            x, hf_labels, pairs = batches[i]
            with autocast:
                out = model(input_ids=x, labels=hf_labels)
                loss = out.loss
                if pairs:  # MCC-KD written the plain way: from the full logits
                    kl = 0
                    for ra, pa, rb, pb in pairs:
                        la = torch.log_softmax(out.logits[ra, pa].float(), -1)
                        lb = torch.log_softmax(out.logits[rb, pb].float(), -1)
                        kl = kl + 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1)).mean()
                    loss = loss + 0.1 * kl / len(pairs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    losses = [float(step(0)), float(step(1))]  # warm-up: compilation (two shapes), allocator, cuBLAS
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(2, len(shapes)):
        last = step(i)
    losses.append(float(last))  # reading it waits for the device
    elapsed = time.perf_counter() - start
    tokens = sum(length for rows in shapes[2:] for _, length in rows)
    return {"side": side, "tokens_per_s": tokens / elapsed, "step_s": elapsed / (len(shapes) - 2),
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
         sides: str = "ours,hf", prompt_fraction: float = 0.0, lengths: str = "svamp"):
    """Print tokens/s, MFU and peak memory of one training step for both engines, and their ratios.

    Args:
        modes: comma-separated: full (full fine-tuning), lora (LoRA, frozen base in --dtype), mcc (MCC-KD, full).
        dim, n_layers, n_heads, n_kv_heads, vocab: the random LLaMA model's shape.
        seq_len, batch: rows per step (mcc: batch/2 questions x 2 rationales), each at most seq_len tokens.
        steps: measured steps (after two warm-up steps), each a batch of its own.
        lora_rank: LoRA rank of the lora mode.
        dtype: fp32, bf16 or fp16 compute.
        device: cpu or cuda (default: cuda when available).
        threads: torch threads per process (0: torch's default).
        compile: ours: auto (on a GPU), True or False.
        peak_tflops: the peak for MFU (0: see the module docstring).
        sides: ours,hf or one of them (e.g. ours alone to check what fits in memory).
        prompt_fraction: with --lengths fixed, the first part of every sequence is a prompt with no loss.
        lengths: svamp (real lengths, each batch its own shape: see bench/lengths.py) or fixed (every row seq_len).
    """
    import torch

    if lengths not in ("svamp", "fixed"):
        raise SystemExit(f"--lengths {lengths!r} is not svamp or fixed")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    peak, peak_how = (peak_tflops * 1e12, f"given, {peak_tflops} TFLOP/s") if peak_tflops else peak_flops(device, dtype)
    print(f"MFU = tokens/s x model FLOPs per token / peak; peak: {peak_how}", flush=True)
    summary = {"device": device, "dtype": dtype, "dim": dim, "n_layers": n_layers, "seq_len": seq_len, "batch": batch,
               "lengths": lengths, "peak_flops": peak, "peak": peak_how, "modes": {}}
    prompt = int(prompt_fraction * seq_len) if lengths == "fixed" else 0
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
            shapes, source = step_shapes(lengths, batch, seq_len, steps + 2, mode, prompt)
            shapes_file = os.path.join(tmp, f"shapes-{mode}.json")
            with open(shapes_file, "w") as f:
                json.dump(shapes, f)
            results = {}
            for side in sides.split(",") if isinstance(sides, str) else sides:
                cmd = [sys.executable, __file__, "--_side", side, "--_hf_dir", os.path.join(tmp, "hf"),
                       "--_native_dir", os.path.join(tmp, "native"), "--_shapes", shapes_file, "--mode", mode,
                       "--lora_rank", str(lora_rank), "--dtype", dtype, "--device", device, "--compile", str(compile)]
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
            rows = [row for b in shapes[2:] for row in b]  # the measured steps
            tokens = sum(length for _, length in rows)
            flops = sum(length * model_flops_per_token(dim, n_layers, n_heads, n_kv_heads, vocab, length,
                                                       mode == "lora", 1.0 - p / length) for p, length in rows) / tokens
            name = {"full": "full fine-tuning", "lora": f"LoRA r={lora_rank}", "mcc": "MCC-KD (full)"}[mode]
            if lengths == "fixed":
                what = f"batch={batch}x{seq_len}" + (f", prompt {prompt_fraction:.0%} of each sequence"
                                                     if prompt_fraction else "")
            else:
                padded = sum(len(b) * max(length for _, length in b) for b in shapes[2:])
                labelled = sum(length - p for p, length in rows) / tokens
                what = (f"batch={batch} rows of real lengths ({source}): {tokens / len(rows):.0f} tokens a row on "
                        f"average, {labelled:.0%} of them labelled, {1 - tokens / padded:.0%} padding, cut at {seq_len}")
            print(f"train step, {name}, {dtype}, {device}, dim={dim} layers={n_layers} {what}")
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
            summary["modes"][mode] = {**results, "flops_per_token": flops, "tokens_measured": tokens,
                                      "widths": [max(length for _, length in b) for b in shapes]}
    print(json.dumps(summary))


if __name__ == "__main__":
    if "--_side" in sys.argv:
        import argparse

        ap = argparse.ArgumentParser()
        for flag in ("_side", "_hf_dir", "_native_dir", "_shapes", "dtype", "device", "mode", "compile"):
            ap.add_argument("--" + flag)
        ap.add_argument("--lora_rank", type=int)
        a = ap.parse_args()
        with open(a._shapes) as f:
            step_rows = [[tuple(row) for row in b] for b in json.load(f)]
        print(json.dumps(run_side(a._side, a._hf_dir, a._native_dir, step_rows, a.mode, a.lora_rank, a.dtype, a.device,
                                  a.compile)))
    else:
        import fire

        fire.Fire(main)
