"""Implicit chain of thought from scratch on generated n x m multiplication (CPU-sized by default):

  python bench/implicit_experiment.py [--out_dir implicit_out] [--n 3] [--m 3] [--teacher_steps 3000] ...

1. data/multiplication.py writes the training lines and held-out valid/test lines (no overlap);
   a word-level tokenizer (one token per digit or symbol) is trained on the training lines;
2. random models of --model_type: the teacher, the student, the emulator and the no-CoT baseline;
3. train_implicit.py teacher, mind_read, emulator, couple, and `teacher --cot False` (the no-CoT
   baseline) with as many optimizer steps as the four stages together, each stage evaluated on the
   valid lines;
4. train_implicit.py evaluate on the test lines: accuracy and examples/s of the explicit-CoT
   teacher, the no-CoT baseline, the mind-reading student (states from the teacher on the gold CoT),
   the coupled implicit student (states from its emulator), and the emulator's state error, all
   decoded by the same loop at the same batch size;
5. report.md and results.json in out_dir.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def word_tokenizer(train_file: str, output: str) -> str:
    """A sentencepiece word model over the training lines: every digit and symbol one token."""
    import sentencepiece as spm

    lines = []
    with open(train_file) as f:
        for line in f:
            if line.strip():
                lines.append(line.replace("||", " ").replace("####", " ").strip())
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:5000]), model_writer=buf, vocab_size=24,
                                   model_type="word", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    with open(output, "wb") as f:
        f.write(buf.getvalue())
    return output


def _run(cmd, log_path: str) -> float:
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        tail = open(log_path).read()[-2000:]
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} failed; the end of {log_path}:\n{tail}")
    return time.time() - start


def main(out_dir: str = "implicit_out", n: int = 3, m: int = 3, n_train: int = 50000, n_valid: int = 200,
         n_test: int = 500, model_type: str = "small-llama", teacher_steps: int = 3000, mind_read_steps: int = 600,
         emulator_steps: int = 600, couple_steps: int = 600, batch_size: int = 32, lr: float = 3e-3,
         warmup_steps: int = 50, eval_batch_size: int = 100, nproc: int = 1, seed: int = 0, test_file: str = None,
         dim: int = 0, n_layers: int = 0, n_heads: int = 0, use_bfloat16: bool = False):
    """Train and evaluate every stage; print and write the results table.

    Args:
        out_dir: where data, checkpoints, logs, report.md and results.json go (reused stages are retrained).
        n: digits of the first operand.
        m: digits of the second operand.
        n_train: generated training lines.
        n_valid: held-out lines evaluated at the end of each stage.
        n_test: held-out lines of the final evaluation.
        model_type: registry preset of every model (random init; the tokenizer sets the vocabulary).
        teacher_steps: optimizer steps of the explicit-CoT teacher.
        mind_read_steps: optimizer steps of the mind-reading student.
        emulator_steps: optimizer steps of the thought emulator.
        couple_steps: optimizer steps of the coupled stage.
        batch_size: lines per optimizer step in every stage.
        lr: peak learning rate of every stage (cosine schedule after warm-up).
        warmup_steps: linear warm-up steps of every stage.
        eval_batch_size: lines decoded together, the same for every model (examples/s compare).
        nproc: processes per stage (tensor-parallel size; 1 runs without torchrun).
        seed: data, initialisation and order seed.
        test_file: evaluate on these `input||cot #### answer` lines (e.g. the seed's 4x4 test file) instead of a generated test split; their questions are kept out of the training lines.
        dim: model width, the FFN width following it (0: the preset's).
        n_layers: model depth (0: the preset's).
        n_heads: attention heads, also the KV heads (0: the preset's).
        use_bfloat16: train and decode in bf16 (on a GPU).
    """
    from data.multiplication import main as make_mult
    from engine import checkpoint as ck
    from engine.text.tokenizer import load_tokenizer
    from models.registry import model_args_for

    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, "data")
    make_mult(
        data,
        n=n,
        m=m,
        n_train=n_train,
        n_valid=n_valid,
        n_test=0 if test_file else n_test,
        seed=seed,
        exclude=test_file,
        overwrite=True,
    )
    test = test_file or os.path.join(data, "test.txt")
    tok = word_tokenizer(os.path.join(data, "train.txt"), os.path.join(out_dir, "tokenizer.model"))
    shape = {k: v for k, v in (("dim", dim), ("n_layers", n_layers)) if v}
    if dim:
        shape["hidden_dim"] = None  # the FFN width follows the new width (LLaMA's 8/3 rule)
    if n_heads:
        shape.update(n_heads=n_heads, n_kv_heads=n_heads)
    model_args = model_args_for(model_type, vocab_size=-(-load_tokenizer(tok).vocab_size // 64) * 64, head_dim=None, **shape)
    inits = {}
    for i, name in enumerate(("teacher", "student", "emulator", "no_cot")):
        inits[name] = os.path.join(out_dir, f"init-{name}")
        ck.write_native(ck.RandomSource(model_args, seed * 10 + i, tokenizer_files=ck.tokenizer_files_for(tok)), inits[name],
                        nproc, overwrite=True, progress=False)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1
              else [sys.executable])
    common = ["--train_file", os.path.join(data, "train.txt"), "--label_file", os.path.join(data, "valid.txt"),
              "--max_batch_size", str(batch_size), "--lr", str(lr), "--warmup_steps", str(warmup_steps),
              "--eval_batch_size", str(eval_batch_size), "--log_every", "25", "--seed", str(seed),
              "--max_new_tokens", "96", "--use_bfloat16", str(use_bfloat16)]
    run = os.path.join(out_dir, "runs")
    total_steps = teacher_steps + mind_read_steps + emulator_steps + couple_steps
    stages = [
        ("teacher", ["teacher", "--ckpt_dir", inits["teacher"], "--max_steps", teacher_steps]),
        ("mind_read", ["mind_read", "--ckpt_dir", inits["student"], "--teacher_dir", f"{run}/teacher",
                       "--max_steps", mind_read_steps]),
        ("emulator", ["emulator", "--ckpt_dir", inits["emulator"], "--teacher_dir", f"{run}/teacher",
                      "--max_steps", emulator_steps]),
        ("couple", ["couple", "--student_dir", f"{run}/mind_read", "--emulator_dir", f"{run}/emulator",
                    "--max_steps", couple_steps]),
        ("no_cot", ["teacher", "--cot", "False", "--ckpt_dir", inits["no_cot"], "--max_steps", total_steps]),
    ]
    seconds = {}
    for name, args in stages:
        save = os.path.join(run, name)
        if os.path.exists(save):
            import shutil

            shutil.rmtree(save)
        cmd = launch + ["train_implicit.py"] + [str(a) for a in args] + common + ["--save_dir", save]
        seconds[name] = _run(cmd, os.path.join(out_dir, f"{name}.log"))
        print(f"{name}: trained in {seconds[name]:.0f} s", flush=True)
    results_file = os.path.join(out_dir, "results.json")
    dirs = ",".join(os.path.join(run, s) for s in ("teacher", "no_cot", "mind_read", "emulator", "couple"))
    _run(launch + ["train_implicit.py", "evaluate", "--data_file", test, "--model_dirs", dirs, "--batch_size",
                   str(eval_batch_size), "--max_new_tokens", "96", "--results_file", results_file, "--overwrite", "True",
                   "--use_bfloat16",
                   str(use_bfloat16)], os.path.join(out_dir, "evaluate.log"))
    results = json.load(open(results_file))
    steps = {"teacher": teacher_steps, "mind_read": mind_read_steps, "emulator": emulator_steps,
             "couple": couple_steps, "no_cot": total_steps}
    label = {"teacher": "explicit-CoT teacher", "no_cot": "no-CoT baseline",
             "mind_read": "mind-reading student (teacher states from the gold CoT)",
             "emulator": "thought emulator", "couple": "coupled implicit student (emulator states, no CoT)"}
    rows = ["| model | optimizer steps | train s | test accuracy | answer digits right, least significant "
            "first | decode examples/s |", "|---|---|---|---|---|---|"]
    for r in results:
        stage = r["stage"]
        if stage == "emulator":
            score, digits, speed = f"state MSE {r['mse']:.4g}", "-", "-"
        else:
            score = f"{r['accuracy']:.3f} ({r['correct']}/{r['total']}, unparsable {r['unparsable']})"
            digits = " ".join(f"{x:.2f}" for x in r["word_accuracy_by_position"])
            speed = f"{r['examples_per_s']:.1f}"
        rows.append(f"| {label[stage]} | {steps[stage]} x {batch_size} | {seconds[stage]:.0f} | {score} | {digits} | "
                    f"{speed} |")
    by = {r["stage"]: r for r in results}
    ratio = by["couple"]["examples_per_s"] / by["teacher"]["examples_per_s"]
    report = "\n".join([f"# Implicit CoT on {n} x {m} multiplication ({model_type}, random init, {nproc} process(es))",
                        "", f"{n_train} training lines, test lines: {test}, batch {batch_size}, lr {lr}, "
                        f"model: dim {model_args.dim}, {model_args.n_layers} layers, {model_args.n_heads} heads.",
                        "", *rows, "",
                        f"Implicit (coupled) decoding runs {ratio:.1f}x the examples/s of explicit CoT on the same "
                        f"inputs, same decoding loop, batch {eval_batch_size}.", ""])
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
