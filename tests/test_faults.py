"""Nothing lost, nothing silent: outputs never overwritten, a job owns its output (two real
processes), flags checked before anything runs, non-finite runs stopped, resume around damage, the
error sentence under torchrun, a full disk, partial outputs of dead runs, progress in log files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checkpoint_split as cks
import infer
import train
from data.arithmetic import main as make_arith
from data.prepare_mcc import main as prepare_main
from engine.runtime.errors import UserError
from tests.helpers import ROOT, child_env, poisoned_copy, run_cli, torchrun


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("faults")
    make_arith(str(root / "arith"), n_train=14, n_test=4, min_value=10, style="fixed", seed=1)
    make_arith(str(root / "long"), n_train=4000, n_test=1, min_value=10, style="fixed", seed=2)  # a long epoch
    cks.init("tiny-llama", str(root / "m"), n=1, tokenizer=tiny_tokenizer, seed=4)
    (root / "q.jsonl").write_text("".join(json.dumps({"instruction": f"What is {i} + {i * 7 % 13} ?", "label": str(i)})
                                          + "\n" for i in range(300)))
    return root


def _train_kw(root, save_dir, **kw):
    return dict(task="ARITH", ckpt_dir=str(root / "m"), save_dir=str(save_dir), train_file=str(root / "arith" / "train.json"),
                template="none", max_seq_len=64, max_batch_size=4, lr=1e-3, max_steps=2, **kw)


def _error(fn, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(**kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def _one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# ----- 1. prepare_mcc.py never overwrites its input or an existing output ---------------------------
@pytest.mark.processes
def test_prepare_mcc_never_overwrites(tmp_path, tiny_tokenizer):
    make_arith(str(tmp_path / "d"), kind="sum3", n_train=20, n_test=2, max_value=9, seed=5)
    raw = tmp_path / "d" / "train.json"
    before = raw.read_bytes()
    proc = run_cli("data/prepare_mcc.py", "--input_file", str(raw), "--output_file", str(raw), "--tokenizer",
                   tiny_tokenizer, "--task", "ARITH")
    assert "is the --input_file" in _one_error_line(proc)
    with pytest.raises(UserError, match="is the --input_file"):  # even when asked to overwrite
        prepare_main(str(raw), str(raw), tiny_tokenizer, task="ARITH", overwrite=True)
    assert raw.read_bytes() == before
    out = tmp_path / "mcc.json"
    prepare_main(str(raw), str(out), tiny_tokenizer, task="ARITH")
    first = out.read_bytes()
    with pytest.raises(UserError, match=r"already exists; pass --overwrite True"):
        prepare_main(str(raw), str(out), tiny_tokenizer, task="ARITH", num_rationales=2)
    assert out.read_bytes() == first
    prepare_main(str(raw), str(out), tiny_tokenizer, task="ARITH", num_rationales=2, overwrite=True)
    assert out.read_bytes() != first


# ----- 2. a job owns its output: a second job stops at once; a dead holder's lock is taken over -----
def _popen(*args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.processes
def test_two_infer_jobs_on_one_output_file(env, tmp_path):
    out = tmp_path / "o.jsonl"
    args = ["infer.py", "--ckpt_dir", str(env / "m"), "--data_file", str(env / "q.jsonl"), "--template", "none",
            "--max_new_tokens", "48", "--output_file", str(out), "--progress", "False"]
    first = _popen(*args, "--batch_size", "1")
    lock = tmp_path / "o.jsonl.lock"
    _wait_for(lambda: out.exists() and out.stat().st_size > 0)  # generating, the lock held
    second = run_cli(*args, "--batch_size", "4")
    line = _one_error_line(second)
    assert first.poll() is None  # the second stopped while the first still ran: it did not wait for it
    assert f"--output_file {out} is in use by another job, pid {first.pid} on " in line and str(lock) in line
    first.send_signal(signal.SIGKILL)  # dies holding the lock: the file stays, the flock goes
    first.wait()
    assert lock.exists()
    third = run_cli(*args, "--batch_size", "4")  # resumes, taking the stale lock over
    assert third.returncode == 0, third.stderr
    assert f"took over {lock}, left by pid {first.pid}" in third.stdout
    lines = [json.loads(x) for x in open(out)]
    assert [r["index"] for r in lines] == list(range(300))
    assert not lock.exists()  # released at the end


@pytest.mark.processes
def test_two_training_jobs_on_one_save_dir(env, tmp_path):
    save = tmp_path / "run"
    args = ["train.py", "--task", "ARITH", "--ckpt_dir", str(env / "m"), "--save_dir", str(save), "--train_file",
            str(env / "long" / "train.json"), "--template", "none", "--max_seq_len", "64", "--max_batch_size", "4"]
    first = _popen(*args, "--max_steps", "100000")  # no checkpoint before the epoch ends (step 1000)
    metrics = save / "metrics.jsonl"

    def steps():
        return [json.loads(line)["step"] for line in open(metrics) if line.endswith("\n")] if metrics.exists() else []

    _wait_for(lambda: len(steps()) >= 3)
    second = run_cli(*args, "--max_steps", "3")  # a fresh start on the same save_dir
    line = _one_error_line(second)
    assert f"--save_dir {save} is in use by another job, pid {first.pid} on " in line
    seen = len(steps())
    _wait_for(lambda: len(steps()) > seen + 5)  # the first job goes on, its log neither truncated nor mixed
    seen = steps()  # read once: the running job appends while we look
    assert first.poll() is None and seen == list(range(1, len(seen) + 1))
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = run_cli(*args, "--max_steps", "2")
    assert third.returncode == 0, third.stderr
    assert f"took over {save / '.lock'}, left by pid {first.pid}" in third.stdout
    assert not (save / ".lock").exists()


# ----- 3, 5, 9. flags checked before anything runs -------------------------------------------------
@pytest.mark.processes
def test_negative_batch_size_stops_instead_of_hanging(env, tmp_path):
    proc = run_cli("train.py", "--task", "ARITH", "--ckpt_dir", str(env / "m"), "--save_dir", str(tmp_path / "s"),
                   "--train_file", str(env / "arith" / "train.json"), "--max_batch_size", "-4", "--max_steps", "5",
                   timeout=120)
    assert _one_error_line(proc) == "error: --max_batch_size must be >= 1, got -4"


def test_training_flag_ranges(env, tmp_path, dist1):
    kw = _train_kw(env, tmp_path / "s")
    for flag, value, message in [("max_batch_size", 0, "--max_batch_size must be >= 1, got 0"),
                                 ("accumulation_steps", 0, "--accumulation_steps must be >= 1, got 0"),
                                 ("log_every", 0, "--log_every must be >= 1, got 0"),
                                 ("eval_batch_size", 0, "--eval_batch_size must be >= 1, got 0"),
                                 ("lr", -1.0, "--lr must be > 0, got -1.0")]:
        assert _error(train.main, **{**kw, flag: value}) == message
    assert "--epochs 0 trains nothing" in _error(train.main, **{**kw, "max_steps": 0, "epochs": 0})
    assert not (tmp_path / "s").exists()  # nothing ran
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert _error(train.main, **_train_kw(env, a_file)) == f"--save_dir {a_file} exists and is a file, not a directory"


@pytest.mark.parametrize("argv,expected", [
    (["train.py", "--lr", "abc"], "error: --lr must be a number, not 'abc'"),
    (["train.py", "--max_batch_size", "4.5"], "error: --max_batch_size must be a whole number, not 4.5"),
    (["train.py", "--tp_size", "3"], "error: --tp_size 3 does not divide the 1 process(es) of this run"),
    (["infer.py", "--temperature", "hot"], "error: --temperature must be a number, not 'hot'"),
    (["infer.py", "--batch_size", "many"], "error: --batch_size must be a whole number, not 'many'"),
    (["infer.py", "--top_k", "-5"], "error: --top_k must be >= 0 (0: off), got -5"),
    (["infer.py", "score", "--batch_size", "0"], "error: --batch_size must be >= 1, got 0"),
    (["checkpoint_split.py", "reshard", "--n", "-2"], "error: --n=-2 must be a shard count >= 1"),
    (["checkpoint_split.py", "reshard", "--n", "0"], "error: --n=0 must be a shard count >= 1"),
])
@pytest.mark.processes
def test_bad_flags_end_in_one_sentence(env, tmp_path, argv, expected):
    script, rest = argv[0], argv[1:]
    sub = [rest.pop(0)] if rest and not rest[0].startswith("--") else []
    if script == "train.py":
        base = ["--task", "ARITH", "--ckpt_dir", str(env / "m"), "--save_dir", str(tmp_path / "s"),
                "--train_file", str(env / "arith" / "train.json")]
    elif script == "infer.py":
        base = ["--ckpt_dir", str(env / "m"), "--data_file", str(env / "q.jsonl"), "--output_file",
                str(tmp_path / "o.jsonl")]
    else:
        base = ["--ckpt_dir", str(env / "m"), "--save_dir", str(tmp_path / "out")]
    line = _one_error_line(run_cli(script, *sub, *base, *rest))
    assert line.startswith(expected), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.jsonl").exists()


@pytest.mark.processes
def test_stop_string_that_looks_like_a_number(env, tmp_path):
    proc = run_cli("infer.py", "--ckpt_dir", str(env / "m"), "--data_file", str(env / "arith" / "test.json"),
                   "--output_file", str(tmp_path / "o.jsonl"), "--template", "none", "--max_new_tokens", "8",
                   "--stop", "5")
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(tmp_path / "o.jsonl.meta.json"))["stop"] == ["5"]


def test_deepspeed_missing_is_one_sentence(env, tmp_path, monkeypatch, dist1):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert _error(train.main, **_train_kw(env, tmp_path / "s"), deepspeed=str(cfg)) == \
        f"--deepspeed {cfg} needs the deepspeed package (pip install deepspeed)"


@pytest.mark.processes
def test_bad_data_files(env, tmp_path, tiny_tokenizer, dist1):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'[{"instruction": "q", "output": "a"},\n {"instruction": "caf\xe9", "output": "b"}]')
    assert _error(train.main, **{**_train_kw(env, tmp_path / "s"), "train_file": str(bad)}) == \
        f"{bad} line 2 is not UTF-8 text (byte 0xe9); save it as UTF-8"
    for records, message in [([{"instruction": " ", "output": "a"}], "record 0: 'instruction' is empty"),
                             ([{"instruction": "q", "output": ""}], "record 0: 'output' is empty"),
                             ([{"instruction": "q", "output": ["a", " "]}], "record 0: 'output' item 1 is empty")]:
        bad.write_text(json.dumps(records))
        assert _error(train.main, **{**_train_kw(env, tmp_path / "s"), "train_file": str(bad)}) == f"{bad} {message}"
    for item, name in [(None, "null"), (7, "int")]:
        bad.write_text(json.dumps([{"instruction": "q", "output": ["1 + 1 = 2 . the answer is 2", item], "label": "2"}]))
        proc = run_cli("data/prepare_mcc.py", "--input_file", str(bad), "--output_file", str(tmp_path / "o.json"),
                       "--tokenizer", tiny_tokenizer, "--task", "ARITH")
        assert _one_error_line(proc) == f"error: {bad} record 0: 'output' item 1 is {name}, not a rationale (a string)"
    assert not (tmp_path / "o.json").exists()


# ----- 4. tokenizer vs model; a run with a non-finite loss stops, NaN weights are never "best" -------
def test_tokenizer_larger_than_the_model_vocabulary(env, tmp_path, dist1):
    from data.make_tokenizer import default_corpus, train_tokenizer

    shutil.copytree(env / "m", tmp_path / "m")
    train_tokenizer(str(tmp_path / "m" / "tokenizer.model"), default_corpus(500), vocab_size=600)
    want = "tokens but the model in"
    assert want in _error(train.main, **{**_train_kw(env, tmp_path / "s"), "ckpt_dir": str(tmp_path / "m")})
    assert want in _error(infer.generate, ckpt_dir=str(tmp_path / "m"), data_file=str(env / "arith" / "test.json"),
                          output_file=str(tmp_path / "o.jsonl"), progress=False)


def test_nan_weights_stop_the_run_and_are_never_best(env, tmp_path, dist1):
    poisoned_copy(env / "m", tmp_path / "nan", "layers.0.attention.wq.weight", (0, 0), float("nan"))
    kw = {**_train_kw(env, tmp_path / "s"), "ckpt_dir": str(tmp_path / "nan"), "max_steps": 50, "save_every": 2,
          "label_file": str(env / "arith" / "test.json"), "eval_at_start": True, "max_new_tokens": 8}
    msg = _error(train.main, **kw)
    assert msg.startswith("training stopped at step 6: the loss has been nan for 6 steps in a row")
    assert not (tmp_path / "s" / "best").exists()
    assert not [p for p in os.listdir(tmp_path / "s") if p.startswith("checkpoint-")]
    assert len([line for line in open(tmp_path / "s" / "metrics.jsonl") if '"eval"' not in line]) == 6


# ----- 5. labels that cannot be read are counted -----------------------------------------------------
def test_unreadable_labels_are_counted(env, tmp_path, dist1, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "What is 1 + 1 ?", "label": "2"},
                                {"instruction": "What is 2 + 2 ?", "label": None},
                                {"instruction": "What is 3 + 3 ?", "label": "abc"}]))
    infer.generate(ckpt_dir=str(env / "m"), data_file=str(data), output_file=str(tmp_path / "o.jsonl"), task="ARITH",
                   template="none", max_new_tokens=4, progress=False)
    summary = json.load(open(tmp_path / "o.jsonl.meta.json"))["summary"]
    assert summary["total"] == 3 and summary["unparsable_labels"] == 2
    assert f"warning: {data}: 2 of 3 labels cannot be read as ARITH answers (records 1, 2)" in capsys.readouterr().out


# ----- 6. resuming infer.py compares every flag that changes a line -----------------------------------
def test_infer_resume_compares_every_flag_that_changes_a_line(env, tmp_path, dist1):
    job = dict(ckpt_dir=str(env / "m"), data_file=str(env / "arith" / "test.json"), output_file=str(tmp_path / "o.jsonl"),
               template="none", max_new_tokens=4, progress=False)
    infer.generate(**job)
    before = (tmp_path / "o.jsonl").read_text()
    for change, flag in [({"task": "ARITH"}, "--task"), ({"output_tokens": True}, "--output_tokens"),
                         ({"use_bfloat16": True}, "the precision (--use_float16 / --use_bfloat16)")]:
        assert _error(infer.generate, **job, **change).startswith(f"--output_file {tmp_path / 'o.jsonl'} was written with {flag} ")
    assert (tmp_path / "o.jsonl").read_text() == before
    infer.generate(**job, batch_size=1)  # a flag that changes no line resumes
    assert (tmp_path / "o.jsonl").read_text() == before


# ----- 7. resuming training around a torn log line and damaged checkpoints -----------------------------
def test_resume_after_torn_log_line_and_damaged_checkpoints(env, tmp_path, dist1, capsys):
    kw = {**_train_kw(env, tmp_path / "s"), "max_steps": 8, "save_every": 2}
    train.main(**kw, exit_after_steps=6)
    metrics = tmp_path / "s" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 7, "epoch": 1, "lo')  # the line a kill cut short
    os.remove(tmp_path / "s" / "checkpoint-6" / "run.json")
    train.main(**kw, resume=True, exit_after_steps=7)
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint-6 (run.json is missing)" in out
    assert f"resumed from {tmp_path / 's' / 'checkpoint-4'} at step 4" in out
    assert [json.loads(line)["step"] for line in open(metrics)] == [1, 2, 3, 4, 5, 6, 7]
    os.remove(tmp_path / "s" / "checkpoint-6" / "trainer_state.00.pt")  # rewritten by the resumed run
    train.main(**kw, resume=True)
    out = capsys.readouterr().out
    assert "skipping checkpoint-6 (trainer_state.00.pt is missing)" in out and "at step 4" in out
    assert [json.loads(line)["step"] for line in open(metrics)] == list(range(1, 9))


# ----- 8. under torchrun the sentence reaches the user whichever rank exits first --------------------
@pytest.mark.processes
@pytest.mark.parametrize("mode", ["rank0_slow", "rank1_only", "slow_to_die"])
def test_error_sentence_survives_torchrun(mode):
    """Printed once whatever the timing (the ranks agree on who prints: no grace period to outlast), on
    its own line, and torchrun's report ends with it: the root cause's traceback line is the sentence
    (the rank's torchelastic error file), not a link; rank 0, whose barrier the failing rank broke, adds
    no traceback of its own (it waits for torchrun's SIGTERM)."""
    with pytest.raises(AssertionError) as e:
        torchrun("tests/workers/error_worker.py", "--mode", mode, timeout=120)
    sentence, lines = f"error: a mistake only {mode} makes", str(e.value).splitlines()
    assert lines.count(sentence) == 1, str(e.value)[-3000:]
    root_cause = lines[[i for i, line in enumerate(lines) if line.startswith("Root Cause")][-1]:]
    assert [line.strip() for line in root_cause if "traceback :" in line] == [f"traceback : {sentence}"]
    assert not [line for line in lines if line.startswith("[rank")], str(e.value)[-3000:]


# ----- 9. a full disk during a save names the path and leaves nothing half-written ---------------------
def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.processes
@pytest.mark.skipif(not _unshare_works(), reason="needs user namespaces to mount a small tmpfs")
def test_full_disk_during_a_save(env, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    save = disk / "run"
    train_cmd = " ".join([sys.executable, "train.py", "--task", "ARITH", "--ckpt_dir", str(env / "m"), "--save_dir",
                          str(save), "--train_file", str(env / "arith" / "train.json"), "--template", "none",
                          "--max_seq_len", "64", "--max_batch_size", "4", "--max_steps", "4", "--save_every", "2"])
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size=200k tmpfs {disk} && {train_cmd} && ls -a {save}"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc)
    assert line.startswith(f"error: the disk is full: writing {save / 'checkpoint-2'}"), line


# ----- 10. the partial output of a killed conversion is removed by the next one ------------------------
@pytest.mark.processes
def test_partial_output_of_a_dead_run_is_removed(env, tmp_path):
    out = tmp_path / "out"
    hold = ("import sys, time; sys.path.insert(0, {root!r}); from engine.runtime.fileio import staged_directory\n"
            "with staged_directory({out!r}) as stage:\n"
            "    open(stage + '/consolidated.00.safetensors', 'wb').write(bytes(1 << 20))\n"
            "    print('ready', flush=True); time.sleep(300)\n").format(root=ROOT, out=str(out))
    dead, alive = (subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True) for _ in range(2))
    try:
        assert dead.stdout.readline().strip() == "ready" and alive.stdout.readline().strip() == "ready"
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert len([p for p in os.listdir(tmp_path) if p.endswith(".partial")]) == 2
        proc = run_cli("checkpoint_split.py", "reshard", "--ckpt_dir", str(env / "m"), "--save_dir", str(out), "--n", "1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("the partial output of a run that died") == 1
        left = [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
        assert len(left) == 1  # the live writer's is untouched
    finally:
        alive.kill()
        alive.wait()


# ----- 11. outside a terminal, progress is a line every N seconds, not a redraw every step ------------
def test_progress_in_a_log_file_is_a_line_every_few_seconds(env, tmp_path, dist1, capfd, monkeypatch):
    from engine.runtime.progress import Progress

    monkeypatch.setattr(Progress, "interval", 0.25)
    start = time.time()
    train.main(**{**_train_kw(env, tmp_path / "s"), "max_steps": 60})
    wall = time.time() - start
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("training: ")]
    assert "\r" not in err, err[-2000:]
    assert 1 <= len(lines) <= wall / 0.25 + 2 and "loss" in lines[-1], lines
    # lines before the first logged step carry no loss yet (a loaded machine takes > 0.25 s a step)
    first = next(i for i, line in enumerate(lines) if "loss" in line)
    assert all("loss" in line for line in lines[first:]), lines


# ----- 12. no launcher and no data script writes over, into or around its inputs -------------------------
def _guard_cases(env, d, tok):
    """(command line, the input it must leave alone, words of the sentence) for every launcher and every
    script in data/, each pointing an output at (or into, or around) one of its own inputs."""
    data, ckpt = d / "t.json", env / "m"
    mult, raw = d / "mult" / "train.txt", d / "sbs"
    lines = ["--template", "none"]
    return [
        (
            ["infer.py", "score", "--ckpt_dir", ckpt, "--data_file", data, "--output_file", data, *lines],
            data,
            "is the --data_file",
        ),
        (
            [
                "infer.py",
                "calibration",
                "--ckpt_dir",
                ckpt,
                "--data_file",
                data,
                "--output_file",
                d / "c.jsonl",
                "--task",
                "ARITH",
                "--plot_file",
                data,
            ],
            data,
            "is the --data_file",
        ),
        (
            ["infer.py", "--ckpt_dir", ckpt, "--data_file", data, "--output_file", ckpt / "p.jsonl", *lines],
            ckpt / "params.json",
            "is inside the --ckpt_dir",
        ),
        (
            ["train.py", "--task", "ARITH", "--ckpt_dir", ckpt, "--save_dir", d, "--train_file", data, *lines],
            data,
            "holds the --train_file",
        ),
        (
            ["train_mcc.py", "--task", "ARITH", "--ckpt_dir", ckpt, "--save_dir", ckpt, "--train_file", data, *lines],
            ckpt / "params.json",
            "is the --ckpt_dir",
        ),
        (
            ["train_implicit.py", "teacher", "--ckpt_dir", ckpt, "--save_dir", mult.parent, "--train_file", mult],
            mult,
            "holds the --train_file",
        ),
        (
            ["train_implicit.py", "evaluate", "--data_file", mult, "--model_dirs", ckpt, "--output_file", mult],
            mult,
            "is the --data_file",
        ),
        (
            [
                "checkpoint_split.py",
                "reshard",
                "--ckpt_dir",
                ckpt,
                "--save_dir",
                ckpt,
                "--n",
                "1",
                "--overwrite",
                "True",
            ],
            ckpt / "consolidated.00.safetensors",
            "is the --ckpt_dir",
        ),
        (
            [
                "checkpoint_split.py",
                "--ckpt_file",
                ckpt / "consolidated.00.safetensors",
                "--save_path",
                ckpt,
                "--n",
                "1",
            ],
            ckpt / "consolidated.00.safetensors",
            "holds the --ckpt_file",
        ),
        (
            [
                "checkpoint_split.py",
                "init",
                "--model_type",
                "tiny-llama",
                "--save_dir",
                d / "i",
                "--tokenizer",
                d / "i" / "t.model",
            ],
            d / "i" / "t.model",
            "holds the --tokenizer",
        ),
        (
            [
                "data/prepare_mcc.py",
                "--input_file",
                data,
                "--output_file",
                data,
                "--tokenizer",
                tok,
                "--task",
                "ARITH",
                "--overwrite",
                "True",
            ],
            data,
            "is the --input_file",
        ),
        (
            ["data/prepare_step_by_step.py", "--dataset_dir", raw, "--output_file", raw / "sbs_train.json"],
            raw / "sbs_train.json",
            "is inside the --dataset_dir",
        ),
        (
            [
                "data/make_formats.py",
                "--input_file",
                data,
                "--output_file",
                d / "p.txt",
                "--cot_prompt_file",
                d / "p.txt",
            ],
            d / "p.txt",
            "is the --cot_prompt_file",
        ),
        (
            ["data/arithmetic.py", "--out_dir", d / "arith"],
            d / "arith" / "train.json",
            "already exists and is not empty; pass --overwrite True",
        ),
        (["data/multiplication.py", "--out_dir", mult.parent, "--exclude", mult], mult, "holds the --exclude"),
        (["data/make_tokenizer.py", "--output", d / "p.txt", "--corpus", d / "p.txt"], d / "p.txt", "is the --corpus"),
    ]


@pytest.mark.processes
def test_no_command_writes_over_into_or_around_its_inputs(env, tmp_path, tiny_tokenizer):
    from data.multiplication import main as make_mult

    shutil.copy(env / "arith" / "test.json", tmp_path / "t.json")
    make_mult(str(tmp_path / "mult"), n=2, m=2, n_train=20, n_valid=0, n_test=0)
    make_arith(str(tmp_path / "arith"), n_train=4, n_test=2)
    (tmp_path / "sbs").mkdir()
    (tmp_path / "sbs" / "sbs_train.json").write_text('{"input": "q", "label": "1"}\n')
    (tmp_path / "i").mkdir()
    shutil.copy(tiny_tokenizer, tmp_path / "i" / "t.model")
    (tmp_path / "p.txt").write_text("Q: 1 + 1 ? A: 2\n")
    for argv, kept, words in _guard_cases(env, tmp_path, tiny_tokenizer):
        before = {p: open(p, "rb").read() for p in [kept] + sorted(str(x) for x in (env / "m").iterdir())}
        line = _one_error_line(run_cli(*map(str, argv)))
        assert words in line, (argv[:2], line)
        assert {p: open(p, "rb").read() for p in before} == before, argv[:2]
    for argv in (  # an existing output of a data script is replaced when asked to
        ["data/arithmetic.py", "--out_dir", tmp_path / "arith", "--n_train", "4", "--n_test", "2"],
        [
            "data/multiplication.py",
            "--out_dir",
            tmp_path / "mult",
            "--n",
            "2",
            "--m",
            "2",
            "--n_train",
            "5",
            "--n_valid",
            "0",
            "--n_test",
            "0",
        ],
        ["data/make_tokenizer.py", "--output", tmp_path / "p.txt"],
    ):
        proc = run_cli(*map(str, argv), "--overwrite", "True")
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.processes
def test_an_output_that_cannot_be_written_is_one_sentence(env, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    job = ["--ckpt_dir", str(env / "m"), "--data_file", str(env / "arith" / "test.json")]
    for argv, words in [
        (
            ["infer.py", "score", *job, "--output_file", "/sys/cot-engine/o.jsonl"],
            "--output_file /sys/cot-engine/o.jsonl: cannot write /sys/cot-engine",
        ),
        (
            ["infer.py", "score", *job, "--output_file", str(a_file / "o.jsonl")],
            f"--output_file {a_file}/o.jsonl: {a_file} is a file, not a directory",
        ),
        (
            ["checkpoint_split.py", "merge", "--ckpt_dir", str(env / "m"), "--save_dir", "/sys/cot-engine"],
            "--save_dir /sys/cot-engine: cannot write /sys/cot-engine",
        ),
        (
            ["checkpoint_split.py", "merge", "--ckpt_dir", str(env / "m"), "--save_dir", str(a_file / "out")],
            f"{a_file} is a file, not a directory",
        ),
    ]:
        line = _one_error_line(run_cli(*argv))
        assert words in line, line


@pytest.mark.processes
def test_score_owns_its_output(env, tmp_path):
    out = tmp_path / "s.jsonl"
    hold = (
        "import sys, time; sys.path.insert(0, {root!r}); from engine.runtime.lock import OwnerLock\n"
        "lock = OwnerLock({lock!r}).acquire('x'); print('ready', flush=True); time.sleep(300)\n"
    ).format(root=ROOT, lock=str(out) + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        proc = run_cli(
            "infer.py",
            "score",
            "--ckpt_dir",
            str(env / "m"),
            "--data_file",
            str(env / "arith" / "test.json"),
            "--output_file",
            str(out),
        )
        assert f"--output_file {out} is in use by another job, pid {holder.pid}" in _one_error_line(proc)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


# ----- 13. Ctrl-C: one line saying what was kept and how to go on, from every rank together -----------------
@pytest.mark.processes
def test_ctrl_c_says_what_was_kept(env, tmp_path):
    cks.reshard(str(env / "m"), str(tmp_path / "m2"), 2)
    save = tmp_path / "run"
    args = [
        "--task", "ARITH", "--ckpt_dir", str(tmp_path / "m2"), "--save_dir", str(save), "--train_file",
        str(env / "long" / "train.json"), "--template", "none", "--max_seq_len", "64", "--max_batch_size", "4",
        "--max_steps", "100000", "--save_every", "3",
    ]  # fmt: skip
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()), "train.py"]
    cmd = [sys.executable, *launch]
    run = subprocess.Popen(
        cmd + args,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for(lambda: (save / "checkpoint-6").exists(), timeout=300)
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the signal to the whole group
    _, err = run.communicate(timeout=120)
    said = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(said) == 1 and "KeyboardInterrupt" not in err and "/engine/" not in err, err[-3000:]
    kept = said[0].split("interrupted: ", 1)[1].split(" (the newest checkpoint)")[0]
    assert said[0].endswith("is kept; add --resume True to the same command to continue from it")
    step = int(kept.rsplit("-", 1)[1])
    assert os.path.isdir(kept) and step >= 6 and not [p for p in os.listdir(save) if p.endswith(".partial")]
    launch[5] = str(_port())
    resumed = run_cli(*launch, *args, "--resume", "True", "--exit_after_steps", str(step + 1))
    assert resumed.returncode == 0 and f"resumed from {kept} at step {step}" in resumed.stdout, resumed.stderr[-3000:]


@pytest.mark.processes
def test_ctrl_c_during_generation(env, tmp_path):
    out = tmp_path / "o.jsonl"
    args = ["infer.py", "--ckpt_dir", str(env / "m"), "--data_file", str(env / "q.jsonl"), "--template", "none",
            "--max_new_tokens", "48", "--output_file", str(out), "--progress", "False", "--batch_size", "1"]  # fmt: skip
    run = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(), stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: out.exists() and out.stat().st_size > 0)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"interrupted: the records finished so far are kept in {out}; run the same command again to resume "
        f"(they are not generated again)"
    )
    assert run_cli(*args).returncode == 0 and len(open(out).readlines()) == 300


def _port() -> int:
    from tests.helpers import _free_port

    return _free_port()


# ----- 14. numbers that do not fit never crash a launcher ---------------------------------------------------
@pytest.mark.processes
def test_numbers_that_do_not_fit_never_crash_a_launcher(env, tmp_path, tiny_tokenizer):
    """engine/text/answers.py reads numbers exactly (tests/test_answers.py); here every launcher the
    issue found crashing runs to its end (or one sentence) on labels nan / inf and a 400-digit answer."""
    huge = "9" * 400
    recs = [
        {"instruction": "What is 1 + 1 ?", "output": "1 + 1 = 2 . Therefore, the answer is 2 .", "label": "nan"},
        {"instruction": "What is 2 + 2 ?", "output": f"2 + 2 = 4 . Therefore, the answer is {huge} .", "label": huge},
        {"instruction": "What is 3 + 3 ?", "output": "3 + 3 = 6 . Therefore, the answer is inf .", "label": "inf"},
        {"instruction": "What is 4 + 4 ?", "output": "4 + 4 = 8 . Therefore, the answer is 8 .", "label": "8"},
    ]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(recs))
    multi = tmp_path / "multi.json"
    multi.write_text(json.dumps([{**r, "output": [r["output"], r["output"].replace(" = ", " equals ")]} for r in recs]))
    preds = tmp_path / "p.json"
    preds.write_text(
        json.dumps(
            [{"output": f"the answer is {huge}", "label": huge}, {"output": "the answer is nan", "label": "1e999"}]
        )
    )
    sbs = tmp_path / "sbs.jsonl"
    sbs.write_text(
        "".join(
            json.dumps({"input": r["instruction"], "label": r["label"], "llm_output": r["output"]}) + "\n" for r in recs
        )
    )
    train_args = ["--task", "ARITH", "--ckpt_dir", str(env / "m"), "--train_file", str(data), "--label_file", str(data),
                  "--template", "none", "--max_seq_len", "64", "--max_batch_size", "2", "--max_steps", "1",
                  "--max_new_tokens", "8", "--eval_at_start", "True"]  # fmt: skip
    for argv in [
        ["train.py", *train_args, "--save_dir", str(tmp_path / "sft")],
        ["train.py", *train_args, "--save_dir", str(tmp_path / "dss"), "--objective", "step_by_step"],
        [
            "infer.py",
            "--ckpt_dir",
            str(env / "m"),
            "--data_file",
            str(data),
            "--output_file",
            str(tmp_path / "g.jsonl"),
            "--task",
            "ARITH",
            "--max_new_tokens",
            "8",
        ],
        ["infer.py", "evaluate", "--task", "ARITH", "--predictions_file", str(preds)],
        [
            "data/prepare_mcc.py",
            "--input_file",
            str(multi),
            "--output_file",
            str(tmp_path / "mcc.json"),
            "--tokenizer",
            tiny_tokenizer,
            "--task",
            "ARITH",
        ],
        [
            "data/prepare_step_by_step.py",
            "--input_file",
            str(sbs),
            "--output_file",
            str(tmp_path / "s.json"),
            "--task",
            "ARITH",
        ],
    ]:
        proc = run_cli(*argv)
        assert "Traceback" not in proc.stderr, (argv[:2], proc.stderr[-3000:])
        assert proc.returncode == 0 or len([x for x in proc.stderr.splitlines() if x.startswith("error: ")]) == 1
