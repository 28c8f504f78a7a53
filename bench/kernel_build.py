"""Build every Triton kernel of models/decode_kernels.py the way the engine launches it, for a GPU this
machine need not have: Triton's own compiler and the ptxas it ships, for a chosen architecture (SM80:
A100; SM90: H100 / H200; SM100: B200), with no driver and no device. Each variant (one set of constexprs and
argument specialisations) is compiled to a cubin, and its resources are read from it:

  regs      registers a thread (at most 255; more per thread means fewer programs per multiprocessor)
  stack     stack-frame and local-memory bytes a thread (register spills: slow)
  shared    shared memory a program (Triton's dynamic share; the launch fails past the device's limit)
  programs  programs one multiprocessor holds at once (by registers, shared memory and warps)
  tensor_ops  tensor-core instructions in the code (mma / wgmma: a tl.dot on 16-bit operands)
  loop_instructions, loop_load_bytes  the longest loop's instructions and the bytes a thread loads
            from global memory in one pass of it: a decode step reads its weights at the HBM's rate
            only if a multiprocessor (4 warp instructions a cycle) issues them fast enough
  wide      the share of the code's global-load instructions that move 16 bytes (a bandwidth-bound
            kernel wants its large loads wide; a few scalar loads of positions and norms are expected)

Why: the tests run these kernels in Triton's CPU interpreter, which accepts what the compiler refuses
(a shared-memory budget, register pressure) and multiplies 16-bit dot operands wrongly, and a GPU session is short. A
variant that does not compile is a line saying why (the exit status is then 1); the others a JSON line
each. The shapes are those of real models, per tensor-parallel rank (models below), the batches 1-4
(fused projections) and 1 / 64 / 384 (attention, in one piece and split, with a sliding window and a
shared prompt segment), in bf16 and fp16.

  python bench/kernel_build.py                                 # every model, SM90 and SM100
  python bench/kernel_build.py --models bench --archs 90 --out kernels.jsonl

Needs Triton with its NVIDIA backend (the PyPI wheel) and TRITON_INTERPRET unset.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.runtime.progress import Progress  # noqa: E402
from models import decode_kernels  # noqa: E402

# per-rank shapes: dim, heads, KV heads, head dim, feed-forward width, experts (0: dense), window, q/k/v bias
MODELS = {
    "bench": (2048, 16, 8, 128, 5440, 0, None, False),  # bench/gpu_check.py's model
    "llama2-7b": (4096, 32, 32, 128, 11008, 0, None, False),
    "mistral-7b": (4096, 32, 8, 128, 14336, 0, 4096, False),
    "qwen2.5-0.5b": (896, 14, 2, 64, 4864, 0, None, True),
    "mixtral-8x7b": (4096, 32, 8, 128, 14336, 8, None, False),
    "llama3-70b-tp8": (8192, 8, 1, 128, 3584, 0, None, False),  # one rank of eight
}
ARCHS = (90, 100)
# shared memory a program may take and a multiprocessor has (bytes): A100, H100 / H200, B200
SHARED = {80: (166912, 167936), 90: (232448, 233472), 100: (232448, 233472)}
SM_REGS, SM_WARPS, SM_PROGRAMS = 65536, 64, 32  # registers, warps and programs a multiprocessor holds
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _NoDeviceDriver:
    """What Triton asks its driver while compiling: the target (here any architecture), a device and
    stream number (the architecture, so each has its own kernel cache)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only(arch: int, built: list):
    """Within: a kernel launch compiles for `arch` and appends (name, constexprs, CompiledKernel or the
    error) to `built` instead of running; the tensors are the CPU's (their dtypes and alignment are what
    a launch specialises on)."""
    from triton.runtime import jit
    from triton.runtime.driver import driver
    run, active = jit.JITFunction.run, driver._active  # no public getter: without a GPU there is no default

    def build(self, *args, grid, warmup, **kwargs):
        names = [p.name for p in self.params]
        constexprs = {k: v for k, v in kwargs.items() if k in names}
        try:
            built.append((self.fn.__name__, constexprs, run(self, *args, grid=grid, warmup=True, **kwargs)))
        except Exception as e:  # Triton's compile errors are long: the first lines say what
            built.append((self.fn.__name__, constexprs, " ".join(str(e).split())[:400] or type(e).__name__))

    driver.set_active(_NoDeviceDriver(arch))
    jit.JITFunction.run = build
    try:
        yield built
    finally:
        jit.JITFunction.run = run
        driver._active = active


def _bin(tool: str) -> str:
    from triton.backends.nvidia import compiler
    return os.path.join(os.path.dirname(compiler.__file__), "bin", tool)


def _longest_loop(sass: str) -> tuple:
    """(instructions, bytes of global loads a thread) of the longest loop in SASS (a branch back), or
    (0, 0): how many instructions the kernel issues for each byte its main loop loads."""
    code = [(int(a, 16), op.strip()) for a, op in re.findall(r"^\s*/\*([0-9a-f]{4,})\*/\s*([^;]*);", sass, flags=re.M)]
    longest = []
    for at, op in code:
        back = re.search(r"\bBRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?(0x[0-9a-f]+)", op)  # (SM100: BRA.U !UP0, 0x..)
        if back and int(back.group(1), 16) < at:
            body = [o for a, o in code if int(back.group(1), 16) <= a <= at]
            longest = max(longest, body, key=len)
    width = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}
    loads = [t for o in longest for t in o.split() if t.startswith("LDG") and t != "LDGDEPBAR"]  # (a barrier)
    return len(longest), sum(next((b for w, b in width.items() if w in ld), 4) for ld in loads)


def resources(kernel, arch: int) -> dict:
    """What the cubin of a CompiledKernel takes on one multiprocessor of `arch`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage, sass = (subprocess.run([_bin("cuobjdump"), flag, f.name], capture_output=True, text=True,
                                      check=True).stdout for flag in ("-res-usage", "-sass"))
    regs, stack, local = (int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL"))
    warps, shared = kernel.metadata.num_warps, kernel.metadata.shared
    regs_a_warp = -(-regs * 32 // 256) * 256  # registers are handed out per warp in units of 256
    per_program, per_sm = SHARED[arch]
    programs = min(SM_PROGRAMS, SM_WARPS // warps, SM_REGS // (regs_a_warp * warps),
                   per_sm // (shared + 1024) if shared else SM_PROGRAMS)  # 1 KiB a program is the system's
    loads = re.findall(r"^\s*(?:@!?%p\d+\s+)?((?:ld\.global|cp\.async\.\w+\.shared\.global)\S*[^;]*)", kernel.asm["ptx"],
                       flags=re.M)  # (cp.async: a load into shared memory, the pipelined loops')
    wide = sum(re.search(r"\.v4\.[bfu]32|\.v2\.[bfu]64", ld) is not None or ", 0x10," in ld for ld in loads)
    tensor_ops = len(re.findall(r"^\s*(?:@!?%p\d+\s+)?w?mma\.", kernel.asm["ptx"], flags=re.M))
    loop_instructions, loop_load_bytes = _longest_loop(sass)
    return dict(warps=warps, regs=regs, stack=stack + local, shared=shared, programs=programs,
                wide=round(wide / len(loads), 2) if loads else None, tensor_ops=tensor_ops,
                loop_instructions=loop_instructions, loop_load_bytes=loop_load_bytes,
                fits=shared <= per_program and regs <= 255)


def _attention_launches(n_heads, n_kv, head_dim, window, dtype):
    """The attention kernels at the batches and KV lengths a decode step meets: one piece and split,
    with a shared prompt segment; with a sliding window where the model has one."""
    gen = torch.Generator().manual_seed(0)
    for rows, kv_len, width in ((1, 128, 0), (1, 4096, 0), (64, 1024, 0), (384, 512, 0), (64, 256, 512)):
        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(dtype)

        cos, sin = rand(rows, head_dim), rand(rows, head_dim)
        q, k, v = rand(rows, n_heads, head_dim), rand(rows, n_kv, head_dim), rand(rows, n_kv, head_dim)
        caches = [torch.empty(rows, n_kv, kv_len, head_dim, dtype=dtype) for _ in range(2)]
        positions = torch.full((rows,), kv_len - 1)
        prompts = ()
        if width:
            prompts = (torch.empty(rows // 8, n_kv, width, head_dim, dtype=dtype),) * 2 + (
                torch.arange(rows) // 8, torch.full((rows,), width))
        decode_kernels.triton_decode_attention(q, k, v, cos, sin, *caches, positions, window, kv_len, *prompts)


def _layer_launches(dim, n_heads, n_kv, head_dim, ffn, experts, bias, dtype):
    """The projections of a fused decode layer (models/transformer.py's _fused_decode) at 1-4 rows:
    RMSNorm + q/k/v (+ bias), the output projection with and without the residual (one rank; under
    tensor parallelism the residual follows the all-reduce), RMSNorm + gate/up, SwiGLU + down; an MoE
    layer's router and its two expert kernels."""
    qkv = (n_heads + 2 * n_kv) * head_dim
    norm = torch.ones(dim, dtype=dtype)
    for rows in (1, 2, 4):
        x, h = torch.empty(rows, dim, dtype=dtype), torch.empty(rows, dim, dtype=dtype)
        linear = decode_kernels.triton_linear
        linear(x, torch.empty(qkv, dim, dtype=dtype), torch.empty(qkv, dtype=dtype) if bias else None, norm)
        attended = torch.empty(rows, n_heads * head_dim, dtype=dtype)
        for residual in (h, None):
            linear(attended, torch.empty(dim, n_heads * head_dim, dtype=dtype), residual=residual)
        if not experts:
            linear(h, torch.empty(2 * ffn, dim, dtype=dtype), norm_weight=norm)
            for residual in (h, None):
                linear(torch.empty(rows, 2 * ffn, dtype=dtype), torch.empty(dim, ffn, dtype=dtype), residual=residual,
                       glu=True)
            continue
        if rows * 2 > experts:  # the fused MoE layer takes at most as many choices as experts
            continue
        linear(h, torch.empty(experts, dim, dtype=dtype), norm_weight=norm)  # the router
        chosen = torch.arange(rows * 2).view(rows, 2) % experts
        decode_kernels.triton_expert_linear(h, torch.empty(experts, 2 * ffn, dim, dtype=dtype), chosen,
                                            norm_weight=norm)
        for residual in (h, None):
            decode_kernels.triton_expert_linear(torch.empty(rows * 2, 2 * ffn, dtype=dtype),
                                                torch.empty(experts, dim, ffn, dtype=dtype), chosen,
                                                torch.rand(rows, 2), residual=residual, glu=True)


def build_all(models=tuple(MODELS), archs=ARCHS, dtypes=("bf16", "fp16")) -> list:
    """[record]: each distinct kernel variant the models' decode steps launch, built for each arch."""
    records, seen = [], set()
    bar = Progress(len(archs) * len(models) * len(dtypes), "building kernels", "shape", stream=sys.stderr)
    for arch in archs:
        for name in models:
            dim, n_heads, n_kv, head_dim, ffn, experts, window, bias = MODELS[name]
            for dt in dtypes:
                dtype = DTYPES[dt]
                built = []
                with compile_only(arch, built):
                    _attention_launches(n_heads, n_kv, head_dim, window, dtype)
                    _layer_launches(dim, n_heads, n_kv, head_dim, ffn, experts, bias, dtype)
                for kernel, constexprs, result in built:
                    key = (arch, kernel, result if isinstance(result, str) else result.hash)
                    if key in seen:
                        continue
                    seen.add(key)
                    record = dict(arch=f"sm{arch}", kernel=kernel, model=name, dtype=dt,
                                  constexprs={k: v for k, v in constexprs.items() if not isinstance(v, bool) or v})
                    if isinstance(result, str):
                        record.update(ok=False, error=result)
                    else:
                        record.update(ok=True, **resources(result, arch))
                    records.append(record)
                bar.update(1, arch=arch, model=name)
    bar.close()
    return records


def main(models: str = ",".join(MODELS), archs: str = "90,100", dtypes: str = "bf16,fp16", out: str = None):
    """Build the decode kernels for GPUs this machine need not have, and say what each variant takes.

    models: comma-separated names of MODELS (per-rank shapes of real models)
    archs: comma-separated SM numbers to build for (80: A100, 90: H100 / H200, 100: B200)
    dtypes: comma-separated activation/weight dtypes (bf16, fp16, fp32)
    out: also write the records as JSON lines to this file (a new file: an existing one is an error)
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench/kernel_build.py: TRITON_INTERPRET=1 is set: the interpreter builds nothing; unset it")
    if out and os.path.exists(out):
        sys.exit(f"bench/kernel_build.py: --out {out} exists; give a new file")

    def pick(value) -> list:  # Fire reads "90,100" as a tuple, "90" as an int
        parts = value if isinstance(value, (tuple, list)) else str(value).split(",")
        return [str(p).strip() for p in parts if str(p).strip()]

    unknown = [m for m in pick(models) if m not in MODELS]
    if unknown:
        sys.exit(f"bench/kernel_build.py: --models: no model named {', '.join(unknown)} (known: {', '.join(MODELS)})")
    bad = [a for a in pick(archs) if not a.isdigit() or int(a) not in SHARED]
    if bad:
        sys.exit(f"bench/kernel_build.py: --archs: {', '.join(bad)} is not one of {', '.join(map(str, SHARED))}")
    bad = [d for d in pick(dtypes) if d not in DTYPES]
    if bad:
        sys.exit(f"bench/kernel_build.py: --dtypes: {', '.join(bad)} is not one of {', '.join(DTYPES)}")
    records = build_all(pick(models), [int(a) for a in pick(archs)], pick(dtypes))
    for r in records:
        print(json.dumps(r))
    if out:
        with open(out + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(out + ".tmp", out)
    failed = [r for r in records if not r["ok"] or not r["fits"]]
    print(f"{len(records)} kernel variants built, {len(failed)} failed or do not fit, "
          f"{sum(r.get('stack', 0) > 0 for r in records)} spill", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    import fire
    fire.Fire(main)
