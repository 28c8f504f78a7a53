"""The first thing to run on a bare GPU machine: one process, at most --budget_s seconds (8 minutes by
default), the most valuable answers first. Every result is a JSON line appended to
OUT_DIR/gpu_check.jsonl the moment it exists, and OUT_DIR/gpu_check.json (the summary) is rewritten
after each section, so a run cut short still leaves what it measured.

  env        torch, CUDA, the device, the packages the engine needs (fairscale, fire: carried as wheels)
  bandwidth  the device's read bandwidth (a sum over a large tensor) and its matmul rate (random data)
  decode     batch-1 decode of the bench model (LLaMA dim 2048, 16 layers, 16 heads / 8 KV, bf16): does
             the CUDA-graph capture work, ms per replay of the captured step, end-to-end tokens/s of the
             generation loop, kernels per step (profiler), the fraction of the read-bandwidth limit; and
             the plain (uncompiled) decode forward, eager and captured by hand, for comparison
  tokens     the captured path's tokens equal the eager path's: greedy and sampled, more prompts than
             slots (refills) and a stop id (rows end unevenly), on an fp32 model whose logits are far apart;
             and every prompt twice, read from a shared prompt segment, against eager copies per row
  train      the trainer's step (compiled blocks on a GPU, chunked loss, fused AdamW) on batches of real
             lengths (bench/lengths.py), each step another shape: tokens/s, MFU, dynamo's graph breaks and
             compiles
  hf         HF generate() at batch 1 and 384 against this engine at the same batches: the ratio
  moe        a Mixtral (8 experts, top 2) at batch 1, dense against fused (the MoE layers reading only the
             chosen experts): the kernels' check, tokens fused == dense, ms per step, the bytes a step needs;
             at batch 64 and 384 the static MoE's grouped-matmul route against its every-expert route

A section that no longer fits in the budget is skipped, and says so; one that fails writes its error
and the next runs (the exit status is then 1, once everything is written). `--device cpu --tiny
True` runs every section with tiny sizes in seconds (tests/test_gpu_check.py); on a CPU both decode
paths are the eager step, so there the tokens section checks the plumbing only.

It drives the engine through its stable entry points: engine.infer.generation's make_runner,
complete_prompts and SamplingParams; engine.checkpoint's load_for_inference, open_checkpoint and
write_native; the model's forward with a KV cache; the trainer through bench/train_step.py's
run_side. What a step runner says about itself (its description, its captured graphs, whether its
compile fell back) is read with getattr and reported as null where the runner no longer has it.
The command that carries the wheels and runs it: BENCHMARKS.md.

  python3 bench/gpu_check.py [--out_dir $OUT] [--budget_s 480] [--sections env,bandwidth,...]
  python3 bench/gpu_check.py --device cpu --tiny True --out_dir /tmp/check          # the CPU smoke run
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("env", "bandwidth", "decode", "fused", "tokens", "train", "hf", "moe")
# seconds each section is expected to need (full sizes on an H200 with compiles, tiny sizes on a CPU)
ESTIMATE = {"env": (5, 0.5), "bandwidth": (10, 0.5), "decode": (150, 3), "fused": (120, 3), "tokens": (90, 3),
            "train": (150, 5), "hf": (90, 3), "moe": (100, 4)}
# prompt + new tokens stay within one KV bucket of the captured step (128) at batch 1, and within two at
# batch 384: few shapes, so few compiles of the decode step
FULL = dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, vocab=32000, dtype="bf16", prompt=64, new_tokens=64,
            big_batch=384, big_prompts=(16, 60), read_bytes=4 * 1024 ** 3, matmul=8192,
            check=dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab=32000), check_prompts=12, check_slots=4,
            check_tokens=24, train_batch=32, train_seq_len=2048, train_steps=4,
            moe=dict(dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, vocab=32000, experts=8,
                     check=dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab=32000)), moe_rows=(64, 384))
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512, dtype="fp32", prompt=8, new_tokens=8,
            big_batch=8, big_prompts=(4, 12), read_bytes=64 * 1024 ** 2, matmul=256,
            check=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512), check_prompts=6, check_slots=2,
            check_tokens=6, train_batch=4, train_seq_len=96, train_steps=2,
            moe=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512, experts=4,
                     check=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512)), moe_rows=(6,))
NOMINAL_PEAK = 989e12  # dense bf16 of an H100 / H200 (the MFU goals count against it)


class OutOfTime(BaseException):  # not an Exception: no `except Exception` on the way may swallow it
    pass


def _out_of_time(signum, frame):
    raise OutOfTime()


class Report:
    """JSON lines as they come, and the summary rewritten after each section."""

    def __init__(self, out_dir: str, meta: dict):
        os.makedirs(out_dir, exist_ok=True)
        self.lines_path = os.path.join(out_dir, "gpu_check.jsonl")
        self.summary_path = os.path.join(out_dir, "gpu_check.json")
        open(self.lines_path, "w").close()
        self.start = time.perf_counter()
        self.summary = {"meta": meta, "status": "running", "sections": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self, section: str, status: str, part: str = None, **fields) -> None:
        """One result: a JSON line now, and in the summary under the section (and its part, e.g. a
        batch size, when a section has several results)."""
        record = {"section": section, "part": part, "status": status, "t_s": round(self.elapsed(), 2), **fields}
        text = json.dumps(record, default=str)
        with open(self.lines_path, "a") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(text, flush=True)
        entry = self.summary["sections"].setdefault(section, {})
        entry["status"] = status
        if part is None:
            entry.update(fields)
        else:
            entry.setdefault("parts", {})[part] = fields
        self.save()

    def save(self) -> None:
        tmp = self.summary_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary, f, indent=1, default=str)
        os.replace(tmp, self.summary_path)


class Check:
    """What the sections share: the device, the sizes, the models (built once, when first needed)."""

    def __init__(self, device: str, tiny: bool, work: str):
        import torch

        self.device, self.tiny, self.work = device, tiny, work
        self.size = TINY if tiny else FULL
        self.dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.size["dtype"]]
        self._info = None
        self.results = {}
        self._models = {}
        g = torch.Generator().manual_seed(0)
        s = self.size
        self.prompt = torch.randint(3, s["vocab"], (s["prompt"],), generator=g).tolist()

    @property
    def info(self):
        """The one-process world (fairscale's groups), set up when a section first needs it, so that
        `env` still reports a machine where fairscale is missing."""
        if self._info is None:
            from engine.runtime import distributed

            self._info = distributed.setup(1, device=self.device)
        return self._info

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def hf_dir(self, name: str, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int, dtype,
               init_range: float = 0.02, experts: int = 0) -> str:
        """A random LLaMA (with `experts`: a Mixtral of that many experts, top 2) written as an HF
        directory (created on the device, so it takes seconds)."""
        path = os.path.join(self.work, name)
        if not os.path.isdir(path):
            import torch
            from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

            config, moe = (MixtralConfig, dict(num_local_experts=experts, num_experts_per_tok=2, sliding_window=None)) \
                if experts else (LlamaConfig, {})
            cfg = config(hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 64 * 64, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                         max_position_embeddings=4096, initializer_range=init_range, **moe)
            torch.manual_seed(0)
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            model.save_pretrained(path)
            del model
        return path

    def bench_dir(self) -> str:
        s = self.size
        return self.hf_dir("bench", s["dim"], s["n_layers"], s["n_heads"], s["n_kv_heads"], s["vocab"], self.dt)

    def bench_model(self):
        """The bench model as infer.py loads it (engine.checkpoint.load_for_inference)."""
        if "bench" not in self._models:
            from engine.checkpoint import load_for_inference

            self._models["bench"] = load_for_inference(self.bench_dir(), None, self.dt, self.info.device, tokenizer=False)[0].eval()
        return self._models["bench"]

    def check_model(self):
        """An fp32 model with weights 5x the usual scale: far-apart logits, so the greedy and sampled
        choices of two correct paths cannot differ by rounding."""
        if "check" not in self._models:
            import torch

            from engine.checkpoint import load_for_inference

            path = self.hf_dir("check", **self.size["check"], dtype=torch.float32, init_range=0.1)
            self._models["check"] = load_for_inference(path, None, torch.float32, self.info.device, tokenizer=False)[0].eval()
        return self._models["check"]

    def weight_bytes(self, model) -> int:
        """What a decode step must read: every weight once except the embedding table (one row a token)."""
        element = model.head_weight.element_size()
        n = sum(p.numel() for p in model.parameters()) * element
        if model.output is not None:
            n -= model.tok_embeddings.weight.numel() * element
        return n

    def kv_bytes(self, tokens: float) -> float:
        s, element = self.size, self.bench_model().head_weight.element_size()
        return 2 * s["n_layers"] * s["n_kv_heads"] * (s["dim"] // s["n_heads"]) * element * tokens


def _runner_facts(runner) -> dict:
    """What a step runner says about itself (attributes read defensively: generation.py is refactored)."""
    from models import compiled

    step_call = getattr(runner, "step_call", None)
    graphs = getattr(runner, "graphs", None)
    return {"runner": type(runner).__name__, "description": getattr(runner, "description", None),
            "compiled_step_active": getattr(step_call, "active", None) if step_call is not None else None,
            "capture_enabled": getattr(runner, "capture", None),
            "graphs_captured": len(graphs) if isinstance(graphs, dict) else None,
            "fallback_messages": sorted(m for m in getattr(compiled, "_SAID", ()) if "failed" in m)}


def _replay_ms(check: Check, fn, n: int) -> float:
    """Median-free mean of n back-to-back calls, timed with CUDA events (host clock on CPU)."""
    import torch

    fn()
    if check.device != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def _kernels_per_call(check: Check, fn, n: int = 5):
    """Device kernels per call of fn, counted by the profiler (None on CPU, or when none were seen)."""
    if check.device != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    return len(kernels) / n if kernels else None


# ------------------------------------------------------------------------------------------------
# The sections
# ------------------------------------------------------------------------------------------------
def section_env(check: Check, report: Report) -> None:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    from bench.lengths import data_dir

    cuda = check.device == "cuda"
    report.line("env", "ok", python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda, device_name=torch.cuda.get_device_name() if cuda else platform.processor(),
                capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
                gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if cuda else None,
                fairscale=version("fairscale"), fire=version("fire"), transformers=version("transformers"),
                commit=commit, length_data=data_dir(),
                fused_unscale_op=hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"))


def section_bandwidth(check: Check, report: Report) -> None:
    import torch

    from bench.generate import read_bandwidth

    s = check.size
    bandwidth = read_bandwidth(check.device, s["read_bytes"])
    n = s["matmul"]
    dt = check.dt if check.device == "cuda" else torch.float32
    g = torch.Generator(device=check.device).manual_seed(0)
    a = torch.randn(n, n, device=check.device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=check.device, dtype=dt, generator=g)
    for _ in range(3):
        a @ b
    ms = _replay_ms(check, lambda: a @ b, 10)
    rate = 2 * n ** 3 / (ms / 1e3)
    check.results.update(bandwidth=bandwidth, matmul_rate=rate)
    report.line("bandwidth", "ok", read_gb_s=bandwidth / 1e9, read_bytes=s["read_bytes"],
                matmul_tflop_s=rate / 1e12, matmul=f"{n}x{n}x{n} {str(dt).replace('torch.', '')}, random data")


def _batch1_decode(check: Check, model) -> dict:
    """One prompt decoded alone by the fastest runner (CUDA graphs on a GPU), twice (the first call
    warms up): end-to-end tokens/s, and the replay of its largest captured shape."""
    from engine.infer.generation import SamplingParams, complete_prompts, make_runner

    s = check.size
    weights = check.weight_bytes(model)
    runner = make_runner(model)
    params = SamplingParams(max_new_tokens=s["new_tokens"])
    _, warm_s = check.timed(lambda: complete_prompts(model, [check.prompt], params, [], 1, runner=runner))
    out, e2e_s = check.timed(lambda: complete_prompts(model, [check.prompt], params, [], 1, runner=runner))
    facts = _runner_facts(runner)
    step_s = e2e_s / s["new_tokens"]
    bandwidth = check.results.get("bandwidth")
    kv = check.kv_bytes(s["prompt"] + s["new_tokens"] / 2)
    row = {"warmup_s": warm_s, "e2e_tokens_per_s": s["new_tokens"] / e2e_s, "e2e_ms_per_step": step_s * 1e3,
           "tokens": len(out[0]), "out": out[0], **facts}
    if bandwidth:
        row["e2e_bandwidth_fraction"] = (weights + kv) / step_s / bandwidth
    graphs = getattr(runner, "graphs", None)
    if isinstance(graphs, dict) and graphs:
        key = max((k for k in graphs if isinstance(k, tuple) and k[0] == 1), key=lambda k: k[1], default=None)
        if key is not None:
            graph = graphs[key]
            row["replay_shape"] = {"rows": key[0], "kv_len": key[1]}
            row["replay_ms"] = _replay_ms(check, graph.replay, 50)
            row["kernels_per_step"] = _kernels_per_call(check, graph.replay)
            if bandwidth:
                row["replay_bandwidth_fraction"] = (weights + check.kv_bytes(key[1])) / (row["replay_ms"] / 1e3) / bandwidth
    return row


def section_decode(check: Check, report: Report) -> None:
    import torch

    model = check.bench_model()
    weights = check.weight_bytes(model)
    report.line("decode", "running", "model", weight_gb=weights / 1e9, n_params=sum(p.numel() for p in model.parameters()))
    row = _batch1_decode(check, model)
    check.results["ours_b1_tokens_per_s"], check.results["ours_b1_tokens"] = row["e2e_tokens_per_s"], row.pop("out")
    report.line("decode", "running", "runner", **row)

    # the plain decode forward (no compile), eager and captured by hand: what the compiled step improves on
    kv_len = 128 if not check.tiny else 16
    cache = model.new_cache(1, kv_len)
    tok = torch.zeros(1, 1, dtype=torch.long, device=check.info.device)
    pos = torch.full((1, 1), kv_len // 2, dtype=torch.long, device=check.info.device)

    def forward():
        model(tok, positions=pos, cache=cache, kv_len=kv_len)

    plain = {"kv_len": kv_len}
    with torch.no_grad(), model.static_shapes():
        plain["eager_ms"] = _replay_ms(check, forward, 10)
        plain["eager_kernels_per_step"] = _kernels_per_call(check, forward, 2)
        plain.update(_captured(check, forward))
    report.line("decode", "ok", "plain_forward", **plain)


def _captured(check: Check, forward) -> dict:
    """forward captured by hand in a CUDA graph (after one run on a side stream): ms per replay and
    kernels per replay, or why the capture failed (a report, not a crash: that is itself the answer);
    {} on a CPU."""
    import torch

    if check.device != "cuda":
        return {}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        return {"captured_ms": _replay_ms(check, graph.replay, 50),
                "captured_kernels_per_step": _kernels_per_call(check, graph.replay)}
    except Exception as e:
        return {"capture_error": " ".join(str(e).split())[:300]}


def _attention_inputs(check: Check, rows: int, kv_len: int, dtype):
    """Random decode-attention inputs of the bench model's heads: positions spread over [kv_len / 8,
    kv_len) (a large batch's rows at different lengths), the last row at the bucket's end."""
    import torch

    s, dev = check.size, check.info.device
    head_dim, n_kv = s["dim"] // s["n_heads"], s["n_kv_heads"]
    g = torch.Generator(device=dev).manual_seed(rows + kv_len)

    def rand(*shape):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    angles = torch.rand(rows, head_dim // 2, device=dev, generator=g) * 6
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    positions = torch.randint(kv_len // 8, kv_len, (rows,), device=dev, generator=g)
    positions[-1] = kv_len - 1
    return (rand(rows, s["n_heads"], head_dim), rand(rows, n_kv, head_dim), rand(rows, n_kv, head_dim), cos, sin,
            rand(rows, n_kv, kv_len, head_dim), rand(rows, n_kv, kv_len, head_dim), positions)


def section_fused(check: Check, report: Report) -> None:
    """--decode_attention fused (models/decode_kernels.py, a Triton kernel on a GPU, its torch twin on
    a CPU): the kernel against its twin on random inputs, the captured fused step's tokens against the
    eager dense step's, batch-1 decode with it, and its attention alone at large batch against the
    dense read and against the bytes it must read (each row's live keys and values)."""
    import torch

    from engine.infer.generation import SamplingParams, complete_prompts, make_runner
    from models import decode_kernels as dk
    from models.transformer import apply_rope, attention_mask, grouped_attention

    s = check.size
    dt = check.dt if check.device == "cuda" else torch.float32
    kernel = check.device == "cuda" and dk.triton_available()
    errors = {}
    for rows, kv_len in ((1, 128), (64, 1024), (7, 320)):
        inputs = _attention_inputs(check, rows, kv_len, dt)
        twin_caches = [t.clone() for t in inputs[5:7]]
        got = dk.fused_decode_attention(*inputs, None, kv_len)
        want = dk.reference(*inputs[:5], *twin_caches, inputs[7], None, kv_len)
        errors[f"{rows}x{kv_len}"] = float((got.float() - want.float()).norm() / want.float().norm())
    report.line("fused", "running", "kernel_vs_twin", kernel=kernel, rel_err=errors, worst_rel_err=max(errors.values()),
                dtype=str(dt).replace("torch.", ""))

    model = check.check_model()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, s["check"]["vocab"], (int(n),), generator=g).tolist()
               for n in torch.randint(4, 40 if not check.tiny else 10, (s["check_prompts"],), generator=g)]
    params = SamplingParams(max_new_tokens=s["check_tokens"], temperature=0.8, top_p=0.9, seed=4)
    dense = complete_prompts(model, prompts, params, [], s["check_slots"], compiled=False)
    try:
        model.decode_attention("fused")
        runner = make_runner(model)
        fused = complete_prompts(model, prompts, params, [], s["check_slots"], runner=runner)
    finally:
        model.decode_attention("dense")
    same = sum(a == b for a, b in zip(dense, fused))
    report.line("fused", "running", "tokens", identical=f"{same}/{len(prompts)}", all_identical=same == len(prompts),
                fast=_runner_facts(runner))

    bench = check.bench_model()
    try:
        bench.decode_attention("fused")
        row = _batch1_decode(check, bench)
    finally:
        bench.decode_attention("dense")
    row["same_tokens_as_dense"] = row.pop("out") == check.results.get("ours_b1_tokens")
    report.line("fused", "running", "batch_1", **row)

    bandwidth = check.results.get("bandwidth")
    kv_len = 1024 if not check.tiny else 64
    for rows in (64, s["big_batch"]):
        q, k, v, cos, sin, k_cache, v_cache, positions = _attention_inputs(check, rows, kv_len, dt)
        mask = attention_mask(positions[:, None], torch.arange(kv_len, device=q.device), None)

        def dense_attention():  # what a dense decode step runs per layer: RoPE, cache write, masked read
            qr, kr = apply_rope(q[:, None], cos[:, None], sin[:, None]), apply_rope(k[:, None], cos[:, None], sin[:, None])
            idx = torch.arange(rows, device=q.device)[:, None]
            k_cache[idx, :, positions[:, None]], v_cache[idx, :, positions[:, None]] = kr, v[:, None]
            return grouped_attention(qr.transpose(1, 2), k_cache, v_cache, mask)

        fused_ms = _replay_ms(check, lambda: dk.fused_decode_attention(q, k, v, cos, sin, k_cache, v_cache, positions,
                                                                       None, kv_len), 20)
        dense_ms = _replay_ms(check, dense_attention, 20)
        live = float((positions + 1).sum()) * 2 * k_cache.shape[1] * k_cache.shape[3] * k_cache.element_size()
        row = {"kv_len": kv_len, "fused_ms": fused_ms, "dense_ms": dense_ms, "dense_over_fused": dense_ms / fused_ms,
               "live_kv_mb": live / 1e6, "dense_read_mb": 2 * k_cache.numel() * k_cache.element_size() / 1e6}
        if bandwidth:
            row["fused_roofline_fraction"] = live / (fused_ms / 1e3) / bandwidth
        report.line("fused", "running" if rows != s["big_batch"] else "ok", f"attention_{rows}", **row)


def section_tokens(check: Check, report: Report) -> None:
    import torch

    from engine.infer.generation import SamplingParams, complete_prompts, make_runner

    s = check.size
    model = check.check_model()
    g = torch.Generator().manual_seed(1)
    vocab = s["check"]["vocab"]
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 40 if not check.tiny else 10, (s["check_prompts"],), generator=g)]
    n_new, slots = s["check_tokens"], s["check_slots"]
    # a stop id the model often emits, so rows end at different steps and slots refill unevenly
    first = complete_prompts(model, prompts, SamplingParams(max_new_tokens=n_new), [], slots, compiled=False)
    counts = torch.bincount(torch.tensor([t for o in first for t in o[2:]] or [0]), minlength=vocab)
    stop = int(counts.argmax())
    for name, params in (("greedy", SamplingParams(max_new_tokens=n_new)),
                         ("sampled", SamplingParams(max_new_tokens=n_new, temperature=0.8, top_p=0.9, top_k=50,
                                                    seed=3))):
        eager_runner = make_runner(model, False)
        eager = complete_prompts(model, prompts, params, [stop], slots, runner=eager_runner)
        fast_runner = make_runner(model)
        fast = complete_prompts(model, prompts, params, [stop], slots, runner=fast_runner)
        same = sum(a == b for a, b in zip(eager, fast))
        mismatch = next(({"prompt": i, "at": next((j for j, (x, y) in enumerate(zip(a, b)) if x != y),
                                                  min(len(a), len(b))), "eager": a[:12], "fast": b[:12]}
                         for i, (a, b) in enumerate(zip(eager, fast)) if a != b), None)
        report.line("tokens", "running", name, identical=f"{same}/{len(prompts)}", all_identical=same == len(prompts), slots=slots,
                    stop_id=stop, stopped_early=sum(len(o) < n_new for o in eager), first_mismatch=mismatch,
                    eager_path=getattr(eager_runner, "description", None), fast=_runner_facts(fast_runner))
    # every prompt twice, greedy: the captured step reading a shared prompt segment vs eager copies per row
    greedy, twice = SamplingParams(max_new_tokens=n_new), prompts * 2
    eager = complete_prompts(model, twice, greedy, [stop], slots, runner=make_runner(model, False), share_prompts=False)
    fast_runner = make_runner(model)
    fast = complete_prompts(model, twice, greedy, [stop], slots, runner=fast_runner)
    same = sum(a == b for a, b in zip(eager, fast))
    report.line("tokens", "ok", "shared_prompts", identical=f"{same}/{len(twice)}", all_identical=same == len(twice),
                segment=getattr(getattr(fast_runner, "cache", None), "prompts", None) is not None,
                fast=_runner_facts(fast_runner))


def section_train(check: Check, report: Report) -> None:
    import torch
    from torch._dynamo.utils import counters

    from bench.train_step import model_flops_per_token, run_side, step_shapes
    from engine import checkpoint as ck

    s = check.size
    hf_dir = check.bench_dir()
    native = os.path.join(check.work, "bench-native")
    if not os.path.isdir(native):
        ck.write_native(ck.open_checkpoint(hf_dir), native, 1, progress=False)
    shapes, source = step_shapes("svamp", s["train_batch"], s["train_seq_len"], s["train_steps"] + 2, "full", 0)
    held = torch.cuda.memory_allocated() if check.device == "cuda" else 0
    counters.clear()
    r = run_side("ours", hf_dir, native, shapes, "full", 16, s["dtype"], check.device, "auto")
    breaks = {k.split("\n")[0][:120]: v for k, v in counters["graph_break"].items()}
    rows = [row for b in shapes[2:] for row in b]
    tokens = sum(length for _, length in rows)
    flops = sum(length * model_flops_per_token(s["dim"], s["n_layers"], s["n_heads"], s["n_kv_heads"], s["vocab"],
                                               length, False, 1.0 - p / length) for p, length in rows) / tokens
    padded = sum(len(b) * max(length for _, length in b) for b in shapes[2:])
    row = {"lengths": source, "rows_per_step": s["train_batch"], "tokens_per_step": tokens / len(shapes[2:]),
           "padding": 1 - tokens / padded, "widths": [max(length for _, length in b) for b in shapes],
           "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"], "first_loss": r["first_loss"],
           "graph_breaks": sum(breaks.values()), "graph_break_reasons": breaks,
           "frames_compiled": counters["frames"].get("total", 0), "graphs": counters["stats"].get("unique_graphs", 0),
           "flops_per_token": flops}
    if check.device == "cuda":
        row["peak_gib_above_held"] = (r["peak_mb"] * 2 ** 20 - held) / 2 ** 30
        row["mfu_vs_989_tflops"] = r["tokens_per_s"] * flops / NOMINAL_PEAK
    if check.results.get("matmul_rate"):
        row["mfu_vs_measured_matmul"] = r["tokens_per_s"] * flops / check.results["matmul_rate"]
    report.line("train", "ok", **row)


def section_hf(check: Check, report: Report) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from bench.generate import _hf_generate
    from engine.infer.generation import SamplingParams, complete_prompts, make_runner

    s = check.size
    model = check.bench_model()
    hf = AutoModelForCausalLM.from_pretrained(check.bench_dir(), dtype=check.dt).to(check.device).eval()
    _hf_generate(hf, [check.prompt], 2, check.device)  # warm-up (cuBLAS, allocator)
    theirs, t_hf = check.timed(lambda: _hf_generate(hf, [check.prompt], s["new_tokens"], check.device))
    ours_b1 = check.results.get("ours_b1_tokens_per_s")
    row = {"hf_tokens_per_s": s["new_tokens"] / t_hf}
    if ours_b1:
        row.update(ours_tokens_per_s=ours_b1, ratio=ours_b1 / row["hf_tokens_per_s"],
                   identical=check.results.get("ours_b1_tokens") == theirs[0])
    report.line("hf", "running", "batch_1", **row)

    n = s["big_batch"]
    g = torch.Generator().manual_seed(2)
    lo, hi = s["big_prompts"]
    prompts = [torch.randint(3, s["vocab"], (int(k),), generator=g).tolist()
               for k in torch.randint(lo, hi + 1, (n,), generator=g)]
    params = SamplingParams(max_new_tokens=s["new_tokens"])
    runner = make_runner(model)
    _, warm_s = check.timed(lambda: complete_prompts(model, prompts, params, [], n, runner=runner))
    mine, t_ours = check.timed(lambda: complete_prompts(model, prompts, params, [], n, runner=runner))
    theirs, t_hf = check.timed(lambda: _hf_generate(hf, prompts, s["new_tokens"], check.device))
    n_tok = n * s["new_tokens"]
    report.line("hf", "ok", f"batch_{n}", ours_tokens_per_s=n_tok / t_ours, hf_tokens_per_s=n_tok / t_hf,
                ratio=t_hf / t_ours, ours_warmup_s=warm_s, identical=f"{sum(a == b for a, b in zip(mine, theirs))}/{n}")


def section_moe(check: Check, report: Report) -> None:
    """A Mixtral at batch 1 with --decode_attention fused, whose MoE layers read only the chosen
    experts (models/decode_kernels.py's expert kernel): the kernels' check against their twins, the
    fused captured step's tokens against the eager dense step's (fp32, far-apart logits), and batch-1
    decode dense vs fused: ms per replayed step, kernels per step, and the bytes a step must read
    (every weight but the embedding table, of the experts only the top 2 of each layer's 8) over the
    read bandwidth. On a CPU the fused MoE layer does not run (the kernels are GPU-only there): plumbing."""
    import torch

    from engine.checkpoint import load_for_inference
    from engine.infer.generation import SamplingParams, complete_prompts, make_runner
    from models import decode_kernels as dk

    s, m = check.size, check.size["moe"]
    dt = check.dt
    why = dk.kernel_check(check.device, dt, m["n_heads"], m["n_kv_heads"], m["dim"] // m["n_heads"], None) \
        if check.device == "cuda" else "not a GPU"
    report.line("moe", "running", "kernel_check", passed=why is None, why=why)

    path = check.hf_dir("moe_check", **m["check"], dtype=torch.float32, init_range=0.1, experts=m["experts"])
    model = load_for_inference(path, None, torch.float32, check.info.device, tokenizer=False)[0].eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, m["check"]["vocab"], (int(n),), generator=g).tolist()
               for n in torch.randint(4, 40 if not check.tiny else 10, (s["check_prompts"] // 2,), generator=g)]
    for name, params in (("greedy", SamplingParams(max_new_tokens=s["check_tokens"])),
                         ("sampled", SamplingParams(max_new_tokens=s["check_tokens"], temperature=0.8, top_p=0.9,
                                                    seed=6))):
        dense = complete_prompts(model, prompts, params, [], 2, compiled=False)
        try:
            model.decode_attention("fused")
            runner = make_runner(model)
            fused = complete_prompts(model, prompts, params, [], 2, runner=runner)
        finally:
            model.decode_attention("dense")
        same = sum(a == b for a, b in zip(dense, fused))
        report.line("moe", "running", f"tokens_{name}", identical=f"{same}/{len(prompts)}",
                    all_identical=same == len(prompts), fast=_runner_facts(runner))
    del model

    path = check.hf_dir("moe_bench", **{k: m[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab")},
                        dtype=dt, experts=m["experts"])
    model = load_for_inference(path, None, dt, check.info.device, tokenizer=False)[0].eval()
    experts = sum(p.numel() for layer in model.layers for p in layer.feed_forward.experts.parameters())
    element = model.head_weight.element_size()
    needed = check.weight_bytes(model) - experts * element * (1 - 2 / m["experts"])
    bandwidth = check.results.get("bandwidth")
    rows = {}
    for kind in ("dense", "fused"):
        try:
            model.decode_attention(kind)
            row = _batch1_decode(check, model)
        finally:
            model.decode_attention("dense")
        rows[kind] = row.pop("out")
        for key in ("e2e_bandwidth_fraction", "replay_bandwidth_fraction"):
            row.pop(key, None)  # counted against all weights; the fraction below counts what a step needs
        if bandwidth and "replay_ms" in row:
            row["needed_bandwidth_fraction"] = needed / (row["replay_ms"] / 1e3) / bandwidth
        row.update(weight_gb=check.weight_bytes(model) / 1e9, needed_gb=needed / 1e9)
        report.line("moe", "running", f"batch_1_{kind}",
                    **row, **({"same_tokens_as_dense": rows["fused"] == rows["dense"]} if kind == "fused" else {}))
    _moe_routes(check, report, model)


def _moe_routes(check: Check, report: Report, model) -> None:
    """The static-shape MoE at large batches: two grouped matmuls over the chosen (row, expert) pairs
    (MoE.forward's grouped route, where torch's grouped matmul runs without the host) against every
    expert on every row (its dense route, E / top_k times the expert FLOPs): models.transformer.
    grouped_experts against a loop over the experts on random inputs (relative error, Frobenius),
    and the plain decode forward of the layer stack at that batch, each route captured by hand."""
    import torch

    from models.transformer import experts_one_by_one, grouped_experts

    kv_len, dev = 128 if not check.tiny else 16, check.info.device
    moes = [layer.feed_forward for layer in model.layers]
    gate_up, down = moes[0].stacked
    n_experts, top_k = gate_up.shape[0], moes[0].top_k
    expert_params = sum(m.stacked[0].numel() + m.stacked[1].numel() for m in moes)
    for rows in check.size["moe_rows"]:
        g = torch.Generator(device=dev).manual_seed(9)
        x = torch.randn(rows, gate_up.shape[2], device=dev, generator=g).to(gate_up.dtype)
        weights = torch.rand(rows, top_k, device=dev, generator=g).softmax(-1)
        chosen = torch.rand(rows, n_experts, device=dev, generator=g).topk(top_k, dim=-1)[1]
        with torch.no_grad():
            got = grouped_experts(x, weights, chosen, gate_up, down).float()
            want = experts_one_by_one(x, weights, chosen, gate_up, down)
        row = {"grouped_vs_loop_rel_err": ((got - want).norm() / want.norm()).item(),
               "expert_tflop_dense": 2 * rows * expert_params / 1e12,
               "expert_tflop_grouped": 2 * rows * expert_params * top_k / n_experts / 1e12}
        cache = model.new_cache(rows, kv_len)
        tok = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        pos = torch.full((rows, 1), kv_len // 2, dtype=torch.long, device=dev)
        for route in ("grouped", "dense"):
            with torch.no_grad(), model.static_shapes():
                if route == "grouped":  # False where torch's grouped matmul would wait for the host: both dense
                    row["grouped_route_available"] = moes[0].grouped
                for m in moes:
                    m.grouped = m.grouped and route == "grouped"
                forward = functools.partial(model, tok, positions=pos, cache=cache, kv_len=kv_len)
                row.update({f"{route}_{k}": v for k, v in {"eager_ms": _replay_ms(check, forward, 5),
                                                           **_captured(check, forward)}.items()})
        if "grouped_captured_ms" in row and "dense_captured_ms" in row:
            row["dense_over_grouped"] = row["dense_captured_ms"] / row["grouped_captured_ms"]
        del cache
        report.line("moe", "ok" if rows == check.size["moe_rows"][-1] else "running", f"batch_{rows}_routes", **row)


RUN = {"env": section_env, "bandwidth": section_bandwidth, "decode": section_decode, "fused": section_fused,
       "tokens": section_tokens, "train": section_train, "hf": section_hf, "moe": section_moe}


def main(out_dir: str = None, budget_s: float = 480, device: str = None, tiny: bool = False, sections: str = "all"):
    """Run the sections in order within the budget; write OUT_DIR/gpu_check.jsonl and gpu_check.json.

    Args:
        out_dir: where the results go (default: $OUT when set, else ./gpu_check_out).
        budget_s: seconds for the whole run, imports included; a section that no longer fits is skipped.
        device: cuda or cpu (default: cuda when available).
        tiny: tiny sizes (the CPU smoke run of tests/test_gpu_check.py).
        sections: comma-separated subset of env,bandwidth,decode,fused,tokens,train,hf,moe (default all).
    """
    start = time.perf_counter()
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = out_dir or os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu_check_out")
    if isinstance(sections, (list, tuple)):  # fire reads "a,b" as a tuple
        sections = ",".join(map(str, sections))
    wanted = list(SECTIONS) if sections in (None, "all") else [x.strip() for x in str(sections).split(",") if x.strip()]
    unknown = [x for x in wanted if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: {', '.join(unknown)} not among {', '.join(SECTIONS)}")
    report = Report(out_dir, {"device": device, "tiny": bool(tiny), "budget_s": budget_s, "sections": wanted,
                              "sizes": TINY if tiny else FULL})
    report.start = start
    previous = signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(max(1, math.ceil(budget_s - report.elapsed())))
    status = "complete"
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            check = Check(device, bool(tiny), work)
            for name in wanted:
                need = ESTIMATE[name][1 if tiny else 0]
                left = budget_s - report.elapsed()
                if left < need:
                    report.line(name, "skipped", reason=f"{left:.0f} s of the budget left, about {need} s needed")
                    continue
                t0 = time.perf_counter()
                try:
                    RUN[name](check, report)
                except OutOfTime:
                    report.line(name, "out_of_time", seconds=time.perf_counter() - t0)
                    status = f"out of time in {name}"
                    break
                except Exception as e:  # the next section still runs
                    report.line(name, "error", error=f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
                                traceback=traceback.format_exc()[-2000:])
                    if device == "cuda":
                        torch.cuda.empty_cache()
                report.summary["sections"][name]["section_s"] = time.perf_counter() - t0
                report.save()
    except OutOfTime:
        status = "out of time"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    failed = [name for name, entry in report.summary["sections"].items() if entry["status"] == "error"]
    report.summary.update(status=status, failed=failed, total_s=report.elapsed())
    report.save()
    print(f"gpu_check: {status} in {report.elapsed():.0f} s" + (f", failed: {', '.join(failed)}" if failed else "")
          + f"; results in {report.lines_path} and {report.summary_path}")
    keys = ("read_gb_s", "matmul_tflop_s", "e2e_tokens_per_s", "replay_ms", "kernels_per_step",
            "replay_bandwidth_fraction", "eager_ms", "captured_ms", "identical", "tokens_per_s", "mfu_vs_989_tflops",
            "graph_breaks", "ours_tokens_per_s", "hf_tokens_per_s", "ratio", "worst_rel_err", "fused_ms", "dense_ms",
            "fused_roofline_fraction", "needed_bandwidth_fraction")
    for name, entry in report.summary["sections"].items():
        for part, r in [(None, entry)] + sorted(entry.get("parts", {}).items()):
            shown = ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r)
            label = name if part is None else f"  {part}"
            print(f"  {label:14s} {entry['status'] if part is None else '':12s} "
                  f"{shown or r.get('error') or r.get('reason') or ''}")
    if failed:  # everything is written; the exit status says that something broke
        raise SystemExit(1)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
