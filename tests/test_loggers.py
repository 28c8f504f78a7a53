"""TensorBoard and W&B (optional, off by default; W&B offline here) and samples.jsonl, read back with
tensorboard's own event reader and from W&B's offline run file: the same numbers as metrics.jsonl, and
the generations of a few evaluation records at each evaluation."""
import glob
import json
import os

import pytest

import checkpoint_split as cks
import train
from engine.runtime.errors import UserError
from engine.runtime.loggers import parse_loggers
from engine.text.answers import extract_answer, is_correct
from tests.helpers import wandb_history


@pytest.fixture
def arith(tmp_path, tiny_tokenizer):
    from data.arithmetic import main as make_arith

    make_arith(str(tmp_path / "data"), n_train=32, n_test=6, style="fixed", min_value=10)
    cks.init("tiny-llama", str(tmp_path / "m"), tokenizer=tiny_tokenizer, seed=2)
    return tmp_path


def _train(root, save_dir, **kw):
    train.main(task="ARITH", ckpt_dir=str(root / "m"), save_dir=str(save_dir), train_file=str(root / "data" / "train.json"),
               label_file=str(root / "data" / "test.json"), template="none", max_seq_len=64, max_batch_size=4, lr=5e-3,
               max_steps=6, eval_every=3, max_new_tokens=12, eval_samples=2, **kw)


def _metrics(save_dir):
    lines = [json.loads(line) for line in open(save_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in lines if not r.get("eval")}, {r["step"]: r for r in lines if r.get("eval")}


def test_tensorboard_and_wandb_hold_the_run_and_its_samples(arith, dist1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save = arith / "run"
    _train(arith, save, log_to="tensorboard,wandb", wandb_mode="offline", run_name="probe")
    losses, evals = _metrics(save)
    samples = [json.loads(line) for line in open(save / "samples.jsonl")]
    assert [s["step"] for s in samples] == [3, 3, 6, 6] and [s["index"] for s in samples[:2]] == [0, 1]
    for s in samples:
        assert s["prediction"] == extract_answer(s["output"], "ARITH")
        assert s["correct"] == is_correct(s["prediction"], s["label"], "ARITH")

    events = EventAccumulator(str(save / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert {e.step: e.value for e in events.Scalars("eval/accuracy")} == pytest.approx(
        {k: v["accuracy"] for k, v in evals.items()})
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("eval/samples/text_summary")}
    assert sorted(texts) == [3, 6] and samples[2]["instruction"] in texts[6]

    run_file = glob.glob(str(save / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_file) == 1
    rows = wandb_history(run_file[0])
    assert {r["_step"]: r["train/loss"] for r in rows} == pytest.approx(losses, rel=1e-6)
    table_rows = [r for r in rows if "eval/samples/path" in r]
    assert [r["_step"] for r in table_rows] == [3, 6]
    table = json.load(open(os.path.join(os.path.dirname(run_file[0]), "files", table_rows[1]["eval/samples/path"])))
    assert [row[2] for row in table["data"]] == [s["output"] for s in samples[2:]]  # the output column


def test_loggers_are_off_by_default_and_resume_keeps_one_history(arith, dist1):
    save = arith / "run"
    _train(arith, save, save_every=3, exit_after_steps=3)
    assert not os.path.exists(save / "tensorboard") and not os.path.exists(save / "wandb")
    _train(arith, save, save_every=3, resume=True)
    assert [json.loads(line)["step"] for line in open(save / "samples.jsonl")] == [3, 3, 6, 6]


def test_logger_flags_are_checked():
    with pytest.raises(UserError, match="--log_to 'mlflow' is not one of tensorboard, wandb"):
        parse_loggers("mlflow")
    with pytest.raises(UserError, match="--wandb_mode 'cloud' is not one of online, offline, disabled"):
        parse_loggers("wandb", "cloud")
    assert parse_loggers(None) == () and parse_loggers("none") == ()


@pytest.mark.processes
def test_a_missing_logger_package_is_one_sentence(arith):
    """In a Python without wandb (the engine's plain install), --log_to wandb stops before anything runs."""
    import subprocess
    import sys

    from tests.helpers import ROOT, child_env, site_without

    site_dir = site_without(arith, ("wandb",))
    proc = subprocess.run([sys.executable, "-S", "train.py", "--task", "ARITH", "--ckpt_dir", str(arith / "m"),
                           "--save_dir", str(arith / "s"), "--train_file", str(arith / "data" / "train.json"),
                           "--log_to", "wandb"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=child_env(PYTHONPATH=f"{ROOT}:{site_dir}"))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "error: --log_to wandb needs the wandb package: pip install wandb==0.31.0 (or pip install "
        "'cot-distill-engine[wandb]')"]
    assert not os.path.exists(arith / "s")
