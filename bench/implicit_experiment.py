"""Implicit chain of thought from scratch: the small fair reproduction (CPU-sized by default).

  python bench/implicit_experiment.py [--out_dir implicit_out] [--n 3] [--m 2] [--teacher_steps 400] ...

1. data/multiplication.py writes n x m multiplication lines (3 x 2 has 81,000 distinct questions),
   split into train / valid / test; the positive control's lines are the same questions with the
   answer itself as the chain of thought (`x||answer #### answer`), so every answer digit stands on
   the teacher's diagonal. A word-level tokenizer (one token per digit or symbol) is trained.
2. Random models of --model_type with --n_layers layers (12: with 3 x 2, the CoT and its closing EOS
   span s2 - s1 = 11 positions, so every CoT token has a layer: delta = 1).
3. train_implicit.py teacher (--teacher_steps), then mind_read, emulator (the authors' emulator) and
   couple with --student_factor times the teacher's steps each; the positive control's mind-reading
   student (same teacher, control lines, same steps); `teacher --cot False` (the no-CoT baseline) with
   as many steps as the four stages together (or --no_cot_steps). Every stage: AdamW, constant learning rate, no warm-up,
   weight decay 0.01 (the authors' settings), the learning rate --lr (see its help).
4. train_implicit.py evaluate on the test lines (the control on its own test lines).
5. A linear probe of what each diagonal state carries: for each teacher state l (LayerNorm'd, as the
   students read them) and each answer digit k, a ridge regression state -> one-hot digit, fitted on
   --n_probe training lines and scored on the test lines; also on the control's states and on the
   emulator's predictions.
6. report.md and results.json in out_dir.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LABEL = {
    "teacher": "explicit-CoT teacher",
    "no_cot": "no-CoT baseline",
    "mind_read": "mind-reading student (teacher states from the gold CoT)",
    "emulator": "thought emulator (authors')",
    "couple": "coupled implicit student (emulator states, no CoT)",
    "control": "positive control: mind-reading student, CoT = the answer",
}


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


def control_lines(src: str, dst: str) -> str:
    """The same questions with the answer as the chain of thought: `x||answer #### answer`."""
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            if line.strip():
                question, rest = line.rstrip("\n").split("||", 1)
                answer = rest.rsplit("####", 1)[1].strip()
                out.write(f"{question}||{answer} #### {answer}\n")
    return dst


def _run(cmd, log_path: str) -> float:
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        tail = open(log_path).read()[-2000:]
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} failed; the end of {log_path}:\n{tail}")
    return time.time() - start


def write_inits(out_dir: str, model_args, tok: str, nproc: int, seed: int) -> dict:
    from engine import checkpoint as ck

    inits = {}
    for i, name in enumerate(("teacher", "student", "emulator", "no_cot", "control")):
        inits[name] = os.path.join(out_dir, f"init-{name}")
        source = ck.RandomSource(model_args, seed * 10 + i, tokenizer_files=ck.tokenizer_files_for(tok))
        ck.write_native(source, inits[name], nproc, overwrite=True, progress=False)
    return inits


def stage_plan(data: dict, run: str, inits: dict, steps: dict) -> list:
    """(name, train_implicit.py arguments) of every run, in order."""
    teacher = f"{run}/teacher"
    real = ["--train_file", data["train"], "--label_file", data["valid"]]
    control = ["--train_file", data["control_train"], "--label_file", data["control_valid"]]
    return [
        ("teacher", ["teacher", "--ckpt_dir", inits["teacher"], *real]),
        ("mind_read", ["mind_read", "--ckpt_dir", inits["student"], "--teacher_dir", teacher, *real]),
        ("emulator", ["emulator", "--ckpt_dir", inits["emulator"], "--teacher_dir", teacher, *real]),
        ("couple", ["couple", "--student_dir", f"{run}/mind_read", "--emulator_dir", f"{run}/emulator", *real]),
        ("control", ["mind_read", "--ckpt_dir", inits["control"], "--teacher_dir", teacher, *control]),
        ("no_cot", ["teacher", "--cot", "False", "--ckpt_dir", inits["no_cot"], *real]),
    ]


def probe_accuracies(train_x, train_y, test_x, test_y, ridge: float = 1.0):
    """Linear probes, one per state l, all answer digits k at once: ridge regression from the state
    (and a bias) to the one-hot digits, fitted in closed form on the training states x [N, L, D],
    y [N, K] (digits 0-9); a digit's prediction is its argmax. Test accuracy [L, K]."""
    import torch

    def design(x):  # [L, N, D + 1], float64 for the solve
        return torch.cat([x, torch.ones(*x.shape[:2], 1)], dim=-1).transpose(0, 1).double()

    a, n_digits = design(train_x), train_y.shape[1]
    target = torch.nn.functional.one_hot(train_y, 10).reshape(len(train_y), -1).double()  # [N, K * 10]
    gram = a.transpose(1, 2) @ a + ridge * torch.eye(a.shape[-1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, a.transpose(1, 2) @ target)  # [L, D + 1, K * 10]
    scores = (design(test_x) @ weight).reshape(weight.shape[0], len(test_y), n_digits, 10)
    return (scores.argmax(-1) == test_y[None]).float().mean(1)


def diagonal_states(run: str, data_file: str, limit: int, which: str):
    """(states [N, L, D], answer digits [N, K]) of the first `limit` lines of data_file: the teacher's
    diagonal states as a student reads them (which="teacher"), or the emulator's predictions of them
    (which="emulator")."""
    import torch

    from engine.checkpoint import load_model
    from engine.distill.implicit.data import CoTExamples, read_cot_lines
    from engine.distill.implicit.stages import load_emulator_head, read_stage
    from engine.distill.implicit.states import StateSpec
    from engine.distill.implicit.tasks import prompt_inputs, teacher_inputs, teacher_states
    from engine.text.tokenizer import load_tokenizer

    lines = read_cot_lines(data_file)[:limit]
    directory, meta = read_stage(os.path.join(run, which), "--probe", (which,))
    model, tok = load_model(directory).eval(), load_tokenizer(directory)
    examples = CoTExamples(lines, {"model": tok}, 10**9, data_file, ("model",))
    spec, n_layers, out = StateSpec(), model.args.n_layers, []
    head = load_emulator_head(directory, meta, None) if which == "emulator" else None
    with torch.no_grad():
        for s in range(0, len(examples), 256):
            encs = [examples.get("model", p) for p in range(s, min(s + 256, len(examples)))]
            if which == "teacher":
                tokens, diag = teacher_inputs(encs, tok.eos_id, n_layers, torch.device("cpu"), spec)
                out.append(teacher_states(model, tokens, diag, list(range(n_layers)), spec))
            else:
                tokens, s1 = prompt_inputs(encs, tok.eos_id, torch.device("cpu"))
                out.append(head(model, tokens, s1))
    digits = torch.tensor([[int(d) for d in line.answer.split()] for line in lines])
    return torch.cat(out).float(), digits


def run_probes(run: str, data: dict, n_probe: int) -> dict:
    """Probe accuracy [L][K] of the teacher's states (gold CoT), the control's (CoT = answer) and the
    emulator's predictions (from x alone)."""
    from engine.runtime import distributed

    distributed.setup(tp_size=1, device="cpu", own=False)
    found = {}
    for name, which, train, test in (
        ("teacher states, gold CoT", "teacher", data["train"], data["test"]),
        ("teacher states, CoT = the answer (control)", "teacher", data["control_train"], data["control_test"]),
        ("emulator's predicted states", "emulator", data["train"], data["test"]),
    ):
        x, y = diagonal_states(run, train, n_probe, which)
        tx, ty = diagonal_states(run, test, 10**9, which)
        found[name] = [[round(float(v), 3) for v in row] for row in probe_accuracies(x, y, tx, ty)]
    return found


def results_table(results: list, steps: dict, seconds: dict, batch_size: int) -> list:
    rows = [
        "| model | optimizer steps | train s | test accuracy | answer digits right, least significant "
        "first | decode examples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r["name"]
        if r["stage"] == "emulator":
            score, digits, speed = f"state MSE {r['mse']:.4g} per element (1 = predicting zeros)", "-", "-"
        else:
            score = f"{r['accuracy']:.3f} ({r['correct']}/{r['total']}, unparsable {r['unparsable']})"
            digits = " ".join(f"{x:.2f}" for x in r["word_accuracy_by_position"])
            speed = f"{r['examples_per_s']:.1f}"
        rows.append(
            f"| {LABEL[name]} | {steps[name]} x {batch_size} | {seconds[name]:.0f} | {score} | {digits} | {speed} |"
        )
    return rows


def probe_table(probes: dict) -> list:
    rows = []
    for name, matrix in probes.items():
        k = len(matrix[0])
        rows += [
            f"Linear probe, {name}: test accuracy of answer digit k (least significant first) from state l",
            "",
            "| state l | " + " | ".join(f"digit {i}" for i in range(k)) + " |",
            "|---" * (k + 1) + "|",
            *[f"| {l} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for l, row in enumerate(matrix)],
            "",
        ]
    return rows


def main(out_dir: str = "implicit_out", n: int = 3, m: int = 2, n_train: int = 80000, n_valid: int = 200,
         n_test: int = 500, model_type: str = "small-llama", dim: int = 64, n_layers: int = 12, n_heads: int = 4,
         teacher_steps: int = 400, student_factor: int = 3, mind_read_steps: int = 0, emulator_steps: int = 0,
         couple_steps: int = 0, no_cot_steps: int = 0, batch_size: int = 32, lr: float = 3e-3,
         weight_decay: float = 0.01, warmup_steps: int = 0, schedule: str = "constant", eval_batch_size: int = 100,
         n_probe: int = 4000, nproc: int = 1, seed: int = 0, test_file: str = None, use_bfloat16: bool = False):
    """Train and evaluate every stage, the positive control and the probes; print and write the report.

    Args:
        out_dir: where data, checkpoints, logs, report.md and results.json go (reused stages are retrained).
        n: digits of the first operand.
        m: digits of the second operand.
        n_train: generated training lines (3 x 2 has 81,000 questions in all, valid and test included).
        n_valid: held-out lines evaluated at each stage's end (best/ by accuracy, ties by digits, then loss).
        n_test: held-out lines of the final evaluation and of the probes.
        model_type: registry preset of every model (random init; the tokenizer sets the vocabulary).
        dim: model width, the FFN width following it (0: the preset's).
        n_layers: model depth (0: the preset's); 12 gives every 3 x 2 CoT token a layer.
        n_heads: attention heads, also the KV heads (0: the preset's).
        teacher_steps: optimizer steps of the explicit-CoT teacher.
        student_factor: the mind-reading student, the emulator, the coupled stage and the control each train this many times the teacher's steps (unless set below).
        mind_read_steps: optimizer steps of the mind-reading student and of the control (0: student_factor x teacher_steps).
        emulator_steps: optimizer steps of the thought emulator (0: student_factor x teacher_steps).
        couple_steps: optimizer steps of the coupled stage (0: student_factor x teacher_steps).
        no_cot_steps: optimizer steps of the no-CoT baseline (0: as many as the four stages together).
        batch_size: lines per optimizer step in every stage (the authors': 32).
        lr: learning rate of every stage (the authors' 5e-5 fine-tunes pretrained GPT-2 for 25k-1M steps; random weights and a few hundred steps need more).
        weight_decay: AdamW weight decay (the authors': torch's default 0.01).
        warmup_steps: linear warm-up steps of every stage (the authors': none).
        schedule: learning-rate schedule after warm-up, constant (the authors'), cosine or linear.
        eval_batch_size: lines decoded together, the same for every model (examples/s compare).
        n_probe: training lines the probes are fitted on.
        nproc: processes per stage (tensor-parallel size; 1 runs without torchrun).
        seed: data, initialisation and order seed.
        test_file: evaluate on these `input||cot #### answer` lines (e.g. the seed's 4x4 test file) instead of a generated test split; their questions are kept out of the training lines.
        use_bfloat16: train and decode in bf16 (on a GPU).
    """
    from data.multiplication import main as make_mult
    from engine.text.tokenizer import load_tokenizer
    from models.registry import model_args_for

    os.makedirs(out_dir, exist_ok=True)
    folder = os.path.join(out_dir, "data")
    make_mult(
        folder,
        n=n,
        m=m,
        n_train=n_train,
        n_valid=n_valid,
        n_test=0 if test_file else n_test,
        seed=seed,
        exclude=test_file,
        overwrite=True,
    )
    data = {split: os.path.join(folder, f"{split}.txt") for split in ("train", "valid", "test")}
    data["test"] = test_file or data["test"]
    for split in ("train", "valid", "test"):
        data[f"control_{split}"] = control_lines(data[split], os.path.join(folder, f"control_{split}.txt"))
    tok = word_tokenizer(data["train"], os.path.join(out_dir, "tokenizer.model"))
    shape = {k: v for k, v in (("dim", dim), ("n_layers", n_layers)) if v}
    if dim:
        shape["hidden_dim"] = None  # the FFN width follows the new width (LLaMA's 8/3 rule)
    if n_heads:
        shape.update(n_heads=n_heads, n_kv_heads=n_heads)
    model_args = model_args_for(
        model_type, vocab_size=-(-load_tokenizer(tok).vocab_size // 64) * 64, head_dim=None, **shape
    )
    inits = write_inits(out_dir, model_args, tok, nproc, seed)
    steps = {"teacher": teacher_steps}
    for name, given in (("mind_read", mind_read_steps), ("emulator", emulator_steps), ("couple", couple_steps)):
        steps[name] = given or student_factor * teacher_steps
    four_stages = sum(steps.values())
    steps.update(control=steps["mind_read"], no_cot=no_cot_steps or four_stages)
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else [])
    common = ["--max_batch_size", batch_size, "--lr", lr, "--schedule", schedule, "--warmup_steps", warmup_steps]
    common += ["--weight_decay", weight_decay, "--eval_batch_size", eval_batch_size, "--log_every", 25]
    common += ["--seed", seed, "--max_new_tokens", 32, "--use_bfloat16", use_bfloat16]
    run, seconds = os.path.join(out_dir, "runs"), {}
    for name, args in stage_plan(data, run, inits, steps):
        save = os.path.join(run, name)
        shutil.rmtree(save, ignore_errors=True)
        cmd = launch + ["train_implicit.py", *args, "--max_steps", steps[name], *common, "--save_dir", save]
        seconds[name] = _run([str(a) for a in cmd], os.path.join(out_dir, f"{name}.log"))
        print(f"{name}: trained in {seconds[name]:.0f} s", flush=True)
    results = evaluate_all(launch, run, data, out_dir, eval_batch_size, use_bfloat16)
    start = time.time()
    probes = run_probes(run, data, n_probe)
    seconds["probes"] = time.time() - start
    write_report(out_dir, locals())


def evaluate_all(launch, run: str, data: dict, out_dir: str, batch_size: int, use_bfloat16: bool) -> list:
    """train_implicit.py evaluate: the five models on the test lines, the control on its own."""
    found = []
    for names, test in (
        (("teacher", "no_cot", "mind_read", "emulator", "couple"), data["test"]),
        (("control",), data["control_test"]),
    ):
        output = os.path.join(out_dir, f"results-{names[0]}.json")
        dirs = ",".join(os.path.join(run, s) for s in names)
        cmd = launch + ["train_implicit.py", "evaluate", "--data_file", test, "--model_dirs", dirs]
        cmd += ["--batch_size", batch_size, "--max_new_tokens", 32, "--results_file", output, "--overwrite", True]
        _run(
            [str(a) for a in cmd + ["--use_bfloat16", use_bfloat16]], os.path.join(out_dir, f"evaluate-{names[0]}.log")
        )
        found += [{**r, "name": name} for name, r in zip(names, json.load(open(output)))]
    return found


def write_report(out_dir: str, run: dict) -> None:
    """report.md and results.json from main's locals."""
    results, model_args = run["results"], run["model_args"]
    by = {r["name"]: r for r in results}
    ratio = by["couple"]["examples_per_s"] / by["teacher"]["examples_per_s"]
    report = "\n".join(
        [
            f"# Implicit CoT on {run['n']} x {run['m']} multiplication ({run['model_type']}, random init, "
            f"{run['nproc']} process(es))",
            "",
            f"{run['n_train']} training lines, {run['n_test']} test lines, batch {run['batch_size']}, AdamW lr "
            f"{run['lr']} constant, no warm-up, weight decay {run['weight_decay']}; every model: dim "
            f"{model_args.dim}, {model_args.n_layers} layers, {model_args.n_heads} heads.",
            "",
            *results_table(results, run["steps"], run["seconds"], run["batch_size"]),
            "",
            f"Implicit (coupled) decoding runs {ratio:.1f}x the examples/s of explicit CoT on the same inputs, "
            f"same decoding loop, batch {run['eval_batch_size']}. Probes: {run['seconds']['probes']:.0f} s.",
            "",
            *probe_table(run["probes"]),
        ]
    )
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report)
    keep = {"results": results, "probes": run["probes"], "seconds": run["seconds"], "steps": run["steps"]}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(keep, f, indent=2)
    print(report)


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
