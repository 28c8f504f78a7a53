"""What the experiment scripts share: running one of our launchers as a user would, and a mean with
its spread over seeds."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, env) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` from the repository root; a failure ends the experiment with its stderr."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc


def as_list(value, kind=str) -> list:
    """A comma-separated flag ("0,1,2") or the list fire already made of it, as a list of `kind`."""
    return [kind(v) for v in (str(value).split(",") if not isinstance(value, (list, tuple)) else value)]


def experiment_env(out: str, threads: str = "1") -> dict:
    """The environment every launcher of an experiment runs in (this checkout first on the path, one
    thread per process unless OMP_NUM_THREADS says otherwise); `out` made first."""
    os.makedirs(out, exist_ok=True)
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}


def two_digit_questions(out: str, n_test: int, student_questions: int, env: dict) -> str:
    """OUT/data: every two-digit addition but n_test held-out ones (data/arithmetic.py, fixed style),
    the first student_questions of them also as questions.json (what the students are asked)."""
    import json

    data = os.path.join(out, "data")
    run_script(["data/arithmetic.py", "--overwrite", "True", "--out_dir", data, "--n_train", str(90 * 90 - n_test),
                "--n_test", str(n_test), "--min_value", "10", "--style", "fixed", "--seed", "0"], env)
    pool = json.load(open(os.path.join(data, "train.json")))
    json.dump(pool[:student_questions], open(os.path.join(data, "questions.json"), "w"))
    return data


def held_out_accuracy(ckpt: str, test_file: str, output: str, env: dict, max_new_tokens: int = 64) -> dict:
    """Greedy exact-match accuracy of a checkpoint on the held-out questions (one infer.py pass)."""
    import json

    if os.path.exists(output):
        os.remove(output)
    run_script(["infer.py", "--ckpt_dir", ckpt, "--data_file", test_file, "--output_file", output, "--task", "ARITH",
                "--max_new_tokens", str(max_new_tokens), "--batch_size", "200", "--template", "none", "--progress",
                "False"], env)
    return json.load(open(output + ".meta.json"))["summary"]


def trained_teacher(out: str, data: str, tok: str, model_type: str, steps: int, lr: float, common: list,
                    env: dict) -> str:
    """OUT/teacher/checkpoint-STEPS: a random model_type trained on data/train.json's gold rationales
    (batch 32, warm-up 50); a finished one is reused by a rerun with other student settings."""
    import shutil

    teacher = os.path.join(out, "teacher")
    ckpt = os.path.join(teacher, f"checkpoint-{steps}")
    if not os.path.exists(ckpt):
        shutil.rmtree(teacher, ignore_errors=True)
        run_script(["checkpoint_split.py", "init", "--model_type", model_type, "--save_dir", os.path.join(out, "t-init"),
                    "--tokenizer", tok, "--seed", "0", "--overwrite", "True"], env)
        run_script(["train.py", "--ckpt_dir", os.path.join(out, "t-init"), "--save_dir", teacher, "--train_file",
                    os.path.join(data, "train.json"), "--max_steps", str(steps), "--max_batch_size", "32", "--lr",
                    str(lr), "--warmup_steps", "50", *common], env)
    return ckpt


def teacher_samples(out: str, data: str, ckpt: str, temperature: float, max_new_tokens: int, env: dict):
    """The teacher's samples of data/questions.json (infer.py at `temperature`) as data/sampled.json,
    samples that are only EOS left out: (that file, the samples kept, the fraction of all correct)."""
    import json

    samples = os.path.join(out, "samples.jsonl")
    if os.path.exists(samples):
        os.remove(samples)
    run_script(["infer.py", "--ckpt_dir", ckpt, "--data_file", os.path.join(data, "questions.json"), "--output_file",
                samples, "--task", "ARITH", "--temperature", str(temperature), "--max_new_tokens",
                str(max_new_tokens), "--batch_size", "100", "--template", "none", "--progress", "False"], env)
    sampled = [json.loads(line) for line in open(samples)]
    accuracy = sum(bool(s["correct"]) for s in sampled) / len(sampled)
    sampled = [s for s in sampled if s["output"].strip()]  # a sample that is only EOS teaches no text
    train_file = os.path.join(data, "sampled.json")
    json.dump([{"instruction": s["instruction"], "output": s["output"], "label": s["label"]} for s in sampled],
              open(train_file, "w"))
    return train_file, sampled, accuracy


def mean_and_spread(values):
    """(mean, sample standard deviation; 0 for one value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
