"""One full on-policy distillation step (the student samples a response per prompt, the teacher scores
every token, the student takes a gradient step on the generalised JSD): this engine's trainer
(train.py --objective on_policy: engine/distill/on_policy/, the decoder of engine/infer/generation.py
on the live weights, the chunked divergence on the vocabulary) against TRL's GKDTrainer (HF `generate`,
full logits), on the same random LLaMA student and teacher, prompts and device, each side in its own
process; where the time goes in each (generation / teacher forward / the student's forward, backward
and optimizer step).

TRL is a bench-only dependency, pinned in bench/requirements-trl.txt (with datasets, which it imports);
install it into a folder of its own and name it, e.g.

  python -m pip install --target /tmp/trl_pkgs --no-deps -r bench/requirements-trl.txt
  python bench/on_policy.py --trl_path /tmp/trl_pkgs [--batch 8] [--new_tokens 32] [--device cuda --dtype bf16]

Both sides sample at temperature 1 with no EOS (every response has --new_tokens tokens, the same work);
TRL's step is GKDTrainer.training_step (generation, teacher and student forwards, backward) plus its
optimizer step, as HF's Trainer runs it, with lmbda 1 and beta --jsd_beta.
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


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _hf_config(dim, n_layers, n_heads, n_kv_heads, vocab, max_len):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 64 * 64, num_hidden_layers=n_layers,
                       num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                       max_position_embeddings=max(max_len, 256), eos_token_id=None, bos_token_id=None,
                       pad_token_id=0)


def _prompts(vocab: int, batch: int, prompt: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, prompt), generator=g)


class _Tok:
    """What the task asks of a tokenizer; these random models have none (no EOS: fixed-length responses)."""

    eos_id, bos_id, padding_id = None, None, 0

    def decode(self, ids):
        return ""


class _Data:
    """The SFTData interface OnPolicyTask reads, over fixed prompts (no rationales: every batch is sampled)."""

    def __init__(self, prompts, max_seq_len):
        self.prompts, self.keep, self.max_seq_len, self.tok = [p.tolist() for p in prompts], list(range(len(prompts))), \
            max_seq_len, _Tok()

    def __len__(self):
        return len(self.keep)

    def full_length(self, index, epoch):
        return len(self.prompts[index]) + 1


def _ours(student_dir, teacher_dir, prompts, new_tokens, beta, dtype, device, compile_mode, steps):
    """Our trainer's real step (Trainer._optimizer_step with OnPolicyTask), timed per part by the task."""
    import torch

    from engine.checkpoint import load_for_inference
    from engine.distill.on_policy.task import OnPolicySettings, OnPolicyTask
    from engine.infer.generation import SamplingParams
    from engine.runtime import distributed
    from engine.train.config import TrainConfig
    from engine.train.launch import build_model
    from engine.train.teacher import FrozenTeacher
    from engine.train.trainer import Trainer

    info = distributed.setup(1, device=device)
    model, _ = build_model(student_dir, None, -1, None, 0.0, "", dtype, info)

    class _Teacher(FrozenTeacher):
        def __init__(self, path):  # the checkpoint has no tokenizer: the model alone, loaded as FrozenTeacher does
            self.model = load_for_inference(path, None, dtype, info.device, tokenizer=False).model
            self.model.eval().requires_grad_(False)

    batch = len(prompts)
    settings = OnPolicySettings(lmbda=1.0, seq_kd=False, divergence="jsd", jsd_beta=beta, kl_temperature=1.0,
                                sampling=SamplingParams(max_new_tokens=new_tokens, temperature=1.0), num_samples=1,
                                seed=0, slots=batch)
    compiled = {"auto": None, "True": True, "False": False}[str(compile_mode)]
    task = OnPolicyTask(_Data(prompts, prompts.shape[1] + new_tokens), info.device, _Teacher(teacher_dir), settings,
                        dtype, compiled)
    cfg = TrainConfig(save_dir=tempfile.mkdtemp(), max_batch_size=batch, max_steps=steps + 2, lr=1e-5,
                      use_bfloat16=dtype == torch.bfloat16, compile=compiled, progress=False, plot=False)
    trainer = Trainer(model, task, cfg, info)

    def step():
        out = trainer._optimizer_step([list(range(batch))])
        return float(out["loss"]), {k: out[f"time_{k}_s"] for k in ("generation", "teacher", "student")}

    return step


def _trl(trl_path, student_dir, teacher_dir, prompts, new_tokens, beta, dtype, device, steps):
    """TRL's GKDTrainer.training_step and its optimizer step, as HF's Trainer runs them; generation and
    the teacher's forward timed by wrapping them."""
    sys.path.append(trl_path)  # after the project's own packages: TRL's folder adds only what they lack
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import pyarrow
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device)
    vocab = student.config.vocab_size
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)},
                                                                              unk_token="t1")), pad_token="t0")
    cfg = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(prompts), learning_rate=1e-5,
                    temperature=1.0, lmbda=1.0, beta=beta, max_new_tokens=new_tokens, report_to=[],
                    use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, max_grad_norm=1.0, logging_steps=10 ** 6,
                    save_strategy="no", disable_tqdm=True)
    # a one-row dataset TRL requires (every step's inputs are handed to training_step); fingerprinted by
    # hand: datasets' own fingerprint pickles pyarrow types that this dill cannot
    data = Dataset(pyarrow.table({"messages": [[{"role": "user", "content": "t1"}]]}), fingerprint="bench")
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, processing_class=tok, train_dataset=data)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 2)
    trainer.current_gradient_accumulation_steps = 1  # what HF's loop sets for one micro-batch per step
    times = {"generation": 0.0, "teacher": 0.0}

    def timed(name, fn):
        def call(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            times[name] += time.perf_counter() - t0
            return out

        return call

    trainer.generate_on_policy_outputs = timed("generation", trainer.generate_on_policy_outputs)
    trainer.teacher_model.forward = timed("teacher", trainer.teacher_model.forward)
    ids = prompts.to(device)
    model = trainer.model

    def step():
        times.update(generation=0.0, teacher=0.0)
        _sync(device)
        t0 = time.perf_counter()
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "prompts": ids,
                  "prompt_attention_mask": torch.ones_like(ids)}
        loss = trainer.training_step(model, inputs)  # num_items_in_batch None: the JSD's mean over the samples
        trainer.accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        value = float(loss)
        total = time.perf_counter() - t0
        return value, {**times, "student": total - times["generation"] - times["teacher"]}

    return step


def run_side(side, trl_path, student_dir, teacher_dir, batch, prompt, new_tokens, beta, dtype, device, compile_mode,
             steps):
    import torch

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    vocab = json.load(open(os.path.join(student_dir, "hf", "config.json")))["vocab_size"]
    prompts = _prompts(vocab, batch, prompt)
    if side == "ours":
        step = _ours(os.path.join(student_dir, "native"), os.path.join(teacher_dir, "native"), prompts, new_tokens,
                     beta, dt, device, compile_mode, steps)
    else:
        step = _trl(trl_path, os.path.join(student_dir, "hf"), os.path.join(teacher_dir, "hf"), prompts, new_tokens,
                    beta, dt, device, steps)
    first, _ = step()  # warm-up (compilation, graph capture, allocator)
    step()
    split = {"generation": 0.0, "teacher": 0.0, "student": 0.0}
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        _, parts = step()
        for k in split:
            split[k] += float(parts[k]) / steps
    elapsed = (time.perf_counter() - start) / steps
    return {"side": side, "step_s": elapsed, "tokens_per_s": batch * (prompt + new_tokens) / elapsed,
            "generated_per_s": batch * new_tokens / elapsed, "split_s": split, "first_loss": first}


def _write_models(tmp, dim, n_layers, n_heads, n_kv_heads, teacher_dim, teacher_layers, vocab, max_len):
    """The random student and teacher, as HF directories (for TRL) and native shards (ours)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine import checkpoint as ck

    for name, d, layers, seed in (("student", dim, n_layers, 0), ("teacher", teacher_dim, teacher_layers, 1)):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(_hf_config(d, layers, n_heads, n_kv_heads, vocab, max_len))
        hf.save_pretrained(os.path.join(tmp, name, "hf"))
        ck.write_native(ck.open_checkpoint(os.path.join(tmp, name, "hf")), os.path.join(tmp, name, "native"), 1,
                        progress=False)


def main(trl_path: str = None, dim: int = 256, n_layers: int = 4, teacher_dim: int = 512, teacher_layers: int = 4,
         n_heads: int = 8, n_kv_heads: int = 4, vocab: int = 32000, batch: int = 8, prompt: int = 32,
         new_tokens: int = 32, jsd_beta: float = 0.5, steps: int = 3, dtype: str = "fp32", device: str = None,
         compile: str = "auto", threads: int = 0, sides: str = "ours,trl"):  # noqa: A002 (--compile)
    """Print each side's tokens/s of a full on-policy step, its time split, and the ratio.

    Args:
        trl_path: a folder holding TRL (pip install --target DIR -r bench/requirements-trl.txt); absent: ours only.
        dim, n_layers, teacher_dim, teacher_layers, n_heads, n_kv_heads, vocab: the random LLaMA student and teacher.
        batch, prompt, new_tokens: prompts per step, their length, tokens sampled per response.
        jsd_beta: the generalised JSD's beta (TRL's beta).
        steps: measured steps (after two warm-up steps).
        dtype: fp32 or bf16 compute (the student's weights stay fp32 on both sides).
        device: cpu or cuda (default: cuda when available).
        compile: ours: auto (CUDA graphs of the compiled decode step and compiled blocks on a GPU), True or False.
        threads: torch threads per process (0: torch's default).
        sides: ours,trl or one of them.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    wanted = sides.split(",") if isinstance(sides, str) else list(sides)
    results = {}
    if "trl" in wanted and not (trl_path and os.path.isdir(os.path.join(trl_path, "trl"))):
        print(f"TRL is absent: --trl_path {trl_path} holds no trl package; install the pinned one with "
              f"`python -m pip install --target DIR --no-deps -r bench/requirements-trl.txt` and pass "
              f"--trl_path DIR. Measuring ours only.", flush=True)
        wanted = [s for s in wanted if s != "trl"]
    with tempfile.TemporaryDirectory() as tmp:
        _write_models(tmp, dim, n_layers, n_heads, n_kv_heads, teacher_dim, teacher_layers, vocab, prompt + new_tokens)
        for side in wanted:
            cmd = [sys.executable, __file__, "--_side", side, "--_trl_path", str(trl_path),
                   "--_student", os.path.join(tmp, "student"), "--_teacher", os.path.join(tmp, "teacher"),
                   "--batch", str(batch), "--prompt", str(prompt), "--new_tokens", str(new_tokens),
                   "--jsd_beta", str(jsd_beta), "--dtype", dtype, "--device", device, "--compile", str(compile),
                   "--steps", str(steps)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in os.environ.get(
                "PYTHONPATH", "").split(os.pathsep) if p])}
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{side} failed:\n{out.stderr[-4000:]}")
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"on-policy step (sample {new_tokens} tokens x {batch} prompts of {prompt}, teacher, JSD beta {jsd_beta} "
          f"step), {dtype}, {device}; student dim {dim} x {n_layers} layers, teacher dim {teacher_dim} x "
          f"{teacher_layers}, vocab {vocab}")
    for side, r in results.items():
        s = r["split_s"]
        print(f"  {side:4s}: {r['tokens_per_s']:8.0f} tokens/s ({r['generated_per_s']:.0f} sampled/s), "
              f"{r['step_s']:.3f} s/step = generation {s['generation']:.3f} + teacher {s['teacher']:.3f} + "
              f"student {s['student']:.3f}  (first loss {r['first_loss']:.4f})")
    if "ours" in results and "trl" in results:
        print(f"  ratio ours/TRL: x{results['ours']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}")
    print(json.dumps({"device": device, "dtype": dtype, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
                      "results": results}))


if __name__ == "__main__":
    if "--_side" in sys.argv:
        import argparse

        ap = argparse.ArgumentParser()
        for name in ("_side", "_trl_path", "_student", "_teacher", "dtype", "device", "compile"):
            ap.add_argument("--" + name)
        for name in ("batch", "prompt", "new_tokens", "steps"):
            ap.add_argument("--" + name, type=int)
        ap.add_argument("--jsd_beta", type=float)
        a = ap.parse_args()
        print(json.dumps(run_side(a._side, a._trl_path, a._student, a._teacher, a.batch, a.prompt, a.new_tokens,
                                  a.jsd_beta, a.dtype, a.device, a.compile, a.steps)))
    else:
        import fire

        fire.Fire(main)
