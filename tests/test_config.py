"""--config FILE: a run written once as YAML or JSON whose keys are the flags, accepted by every
launcher (and sub-command); flags on the command line win; the file is recorded with the run; an
unknown key is refused with one sentence naming the file and the key."""
import json
import sys

import pytest
import torch

import checkpoint_split as cks
import infer
import train
import train_implicit
from engine.runtime import cli
from tests.helpers import full_weights


def _run(monkeypatch, component, *argv):
    monkeypatch.setattr(sys, "argv", ["launcher.py", *argv])
    monkeypatch.setattr(cli, "_CONFIG", {})
    cli.run_cli(component)


def _refused(monkeypatch, capsys, component, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, component, *argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def arith(tmp_path, tiny_tokenizer):
    from data.arithmetic import main as make_arith

    make_arith(str(tmp_path / "data"), n_train=16, n_test=4, style="fixed", min_value=10)
    cks.init("tiny-llama", str(tmp_path / "m"), tokenizer=tiny_tokenizer, seed=1)
    return tmp_path


def test_train_from_a_yaml_run_file_with_a_flag_overriding_it(arith, monkeypatch, dist1):
    run = arith / "run.yaml"
    run.write_text(f"task: ARITH\nckpt_dir: {arith / 'm'}\ntrain_file: {arith / 'data' / 'train.json'}\n"
                   f"save_dir: {arith / 's'}\nmax_steps: 5\nlr: 3e-3\nmax_batch_size: 4\ntemplate: none\n"
                   f"max_seq_len: 64\nlora_targets: [wq, wv]\n")
    _run(monkeypatch, train.main, "--config", str(run), "--max_steps", "2")
    record = json.load(open(arith / "s" / "run_config.json"))
    assert record["max_steps"] == 2 and record["lr"] == 3e-3 and record["lora_targets"] == "wq,wv"
    assert record["config_file"] == str(run) and record["config"]["max_steps"] == 5
    assert [json.loads(line)["step"] for line in open(arith / "s" / "metrics.jsonl")] == [1, 2]


def test_json_run_file_for_a_sub_command(arith, monkeypatch, capsys, tiny_tokenizer, dist1):
    run = arith / "init.json"
    run.write_text(json.dumps({"model_type": "tiny-llama", "save_dir": str(arith / "c"), "seed": 7, "n": 2,
                               "tokenizer": tiny_tokenizer}))
    _run(monkeypatch, cks.COMMANDS, "init", "--config", str(run), "--seed", "1")
    want, got = full_weights(arith / "m"), full_weights(arith / "c")  # seed 1, as the command line says
    assert all(torch.equal(want[k], got[k]) for k in want)
    preds = arith / "p.jsonl"
    preds.write_text(json.dumps({"output": "Therefore, the answer is 3 .", "label": "3"}) + "\n")
    (arith / "ev.json").write_text(json.dumps({"task": "ARITH", "predictions_file": str(preds)}))
    capsys.readouterr()
    _run(monkeypatch, infer.COMMANDS, "evaluate", "--config", str(arith / "ev.json"))
    assert json.loads(capsys.readouterr().out)["correct"] == 1


def test_unknown_keys_and_bad_files_are_one_sentence(arith, monkeypatch, capsys):
    (arith / "bad.yaml").write_text("task: ARITH\nlrr: 0.1\n")
    msg = _refused(monkeypatch, capsys, train.main, "--config", str(arith / "bad.yaml"))
    assert msg == f"error: {arith / 'bad.yaml'}: unknown key 'lrr', not a flag of launcher.py (see its --help)"
    msg = _refused(monkeypatch, capsys, train_implicit.COMMANDS, "evaluate", "--config", str(arith / "bad.yaml"))
    assert "unknown key 'task', not a flag of launcher.py evaluate" in msg
    (arith / "list.yaml").write_text("- 1\n- 2\n")
    assert "must map flag names to values" in _refused(monkeypatch, capsys, train.main, "--config",
                                                       str(arith / "list.yaml"))
    (arith / "broken.json").write_text("{")
    assert "is not valid JSON" in _refused(monkeypatch, capsys, train.main, "--config", str(arith / "broken.json"))
    assert "does not exist" in _refused(monkeypatch, capsys, train.main, "--config", str(arith / "nope.yaml"))
    (arith / "lr.yaml").write_text("lr: fast\n")
    assert "lr.yaml: lr must be a number, not 'fast'" in _refused(monkeypatch, capsys, train.main, "--config",
                                                          str(arith / "lr.yaml"))
