"""The shared mechanisms behind "Nothing lost, nothing silent", in one process (the promises about
processes, signals and real launchers are tests/test_faults.py's): the output guard, OS errors as
sentences, umask permissions, the run signature on resume, ModelArgs read from any file, flag ranges
and relations, --help types, JSON lines split on \\n only."""

import errno
import json
import math
import os
import shutil
import stat

import pytest

import checkpoint_split as cks
import infer
import train
from engine.runtime import outputs as out
from engine.runtime.errors import UserError
from engine.runtime.fileio import atomic_write_text, staged_directory
from engine.text.records import read_records
from tests.helpers import arith_and_model, poisoned_copy


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer):
    return arith_and_model(tmp_path_factory.mktemp("outputs"), tiny_tokenizer, "tiny-llama", "m", n_train=14,
                           n_test=4, data_seed=1, model_seed=4)


def _error(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def _train_kw(root, save_dir, **kw):
    return dict(
        task="ARITH",
        ckpt_dir=str(root / "m"),
        save_dir=str(save_dir),
        train_file=str(root / "arith" / "train.json"),
        template="none",
        max_seq_len=64,
        max_batch_size=4,
        lr=1e-3,
        max_steps=2,
        **kw,
    )


# ----- the guard: an output is never an input, nor inside or around one ---------------------------------
def test_relations_between_outputs_and_inputs(tmp_path):
    data = tmp_path / "d" / "data.json"
    data.parent.mkdir()
    data.write_text("[]")
    (tmp_path / "ckpt").mkdir()
    os.link(data, tmp_path / "hard.json")
    os.symlink(data, tmp_path / "soft.json")
    inputs = [("--data_file", str(data)), ("--ckpt_dir", str(tmp_path / "ckpt"))]

    def refused(path, is_dir=False, beside=()):
        return _error(out.check_relations, [out.Output("--output_file", str(path), is_dir, beside)], inputs)

    assert refused(data).startswith(f"--output_file {data} is the --data_file {data}")
    assert "is the --data_file" in refused(tmp_path / "hard.json")  # the same file under another name
    assert "is the --data_file" in refused(tmp_path / "soft.json")
    assert "(its data.json) is the --data_file" in refused(tmp_path / "x", beside=(str(data),))
    assert "is inside the --ckpt_dir" in refused(tmp_path / "ckpt" / "preds.jsonl")
    assert "holds the --data_file" in refused(tmp_path / "d", is_dir=True)
    assert "holds the --data_file" in refused(tmp_path, is_dir=True)  # the first input it holds
    out.check_relations([out.Output("--output_file", str(tmp_path / "d" / "other.json"))], inputs)  # a sibling
    parts = out.Output("--output_file", str(tmp_path / "d" / "data"), beside_suffixes=r"\.part[1-9][0-9]*")
    out.check_relations([parts], inputs)  # "data" + ".json" is no part
    renamed = [("--data_file", str(tmp_path / "d" / "data.part12"))]
    assert "writes and removes files named like the --data_file" in _error(out.check_relations, [parts], renamed)


def test_existing_outputs_and_impossible_paths(tmp_path):
    f = tmp_path / "o.jsonl"
    f.write_text("x")
    file_out, dir_out = out.Output("--output_file", str(f)), out.Output("--save_dir", str(tmp_path), is_dir=True)
    assert (
        _error(out.check_existing, file_out, False)
        == f"--output_file {f} already exists; pass --overwrite True to replace it"
    )
    assert "already exists and is not empty" in _error(out.check_existing, dir_out, False)
    out.check_existing(file_out, True)
    out.check_existing(file_out, False, continues=lambda p: True)  # a file the command resumes
    assert (
        _error(out.check_shape, out.Output("--output_file", str(tmp_path)))
        == f"--output_file {tmp_path} is a directory; name a file"
    )
    assert "exists and is a file, not a directory" in _error(out.check_shape, out.Output("--save_dir", str(f), True))
    under = out.Output("--output_file", str(f / "deeper" / "x.jsonl"))
    assert _error(out.check_shape, under) == f"--output_file {f}/deeper/x.jsonl: {f} is a file, not a directory"


def test_os_errors_become_one_sentence_naming_path_and_flag(tmp_path):
    target = tmp_path / "run" / "checkpoint-2"
    out.register([out.Output("--save_dir", str(tmp_path / "run"), is_dir=True)])
    for code, words in [
        (errno.ENOSPC, "the disk is full: writing"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
        (errno.ENOTDIR, "a part of the path is a file"),
        (errno.EIO, os.strerror(errno.EIO)),
    ]:
        with pytest.raises(out.OutputError) as e, out.output_errors(str(target)):
            raise OSError(code, os.strerror(code), str(target / "x"))
        assert words in str(e.value) and "--save_dir" in str(e.value), str(e.value)


def test_writes_guards_a_plain_function_command(tmp_path):
    calls = []

    @out.writes("output_file", inputs=("tokenizer",))
    def command(input_file, output_file, tokenizer=None, overwrite=False):
        calls.append(output_file)
        atomic_write_text(output_file, "done")

    src = tmp_path / "in.json"
    src.write_text("x")
    assert "is the --input_file" in _error(command, str(src), str(src), overwrite=True)
    assert "is the --tokenizer" in _error(command, str(src), str(tmp_path / "tok"), str(tmp_path / "tok"))
    command(str(src), str(tmp_path / "o"))
    assert "already exists" in _error(command, str(src), str(tmp_path / "o"))
    command(str(src), str(tmp_path / "o"), overwrite=True)
    assert calls == [str(tmp_path / "o")] * 2 and not (tmp_path / "o.lock").exists()  # the lock is gone again


def test_outputs_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "f.json"), "{}")
        with staged_directory(str(tmp_path / "d")) as stage:
            atomic_write_text(os.path.join(stage, "params.json"), "{}")
        os.umask(0o077)
        atomic_write_text(str(tmp_path / "private.json"), "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "f.json") == 0o644 and mode(tmp_path / "d") == 0o755
    assert mode(tmp_path / "d" / "params.json") == 0o644 and mode(tmp_path / "private.json") == 0o600


# ----- every launcher goes through it -----------------------------------------------------------------
def test_launchers_refuse_outputs_that_are_inputs(env, tmp_path, dist1):
    data = tmp_path / "t.json"
    shutil.copy(env / "arith" / "test.json", data)
    before = data.read_bytes()
    job = dict(ckpt_dir=str(env / "m"), data_file=str(data), template="none")
    assert "is the --data_file" in _error(infer.score, output_file=str(data), **job)
    assert "is the --data_file" in _error(
        infer.calibration, output_file=str(tmp_path / "c"), task="ARITH", plot_file=str(data), **job
    )
    assert "is inside the --ckpt_dir" in _error(
        infer.generate, output_file=str(env / "m" / "p.jsonl"), progress=False, **job
    )
    part = tmp_path / "p.jsonl.part1"  # the name of a replica's part: a generation run would remove it
    shutil.copy(data, part)
    assert "writes and removes files named like the --data_file" in _error(
        infer.generate, output_file=str(tmp_path / "p.jsonl"), progress=False, **{**job, "data_file": str(part)})
    assert part.read_bytes() == before and not (tmp_path / "p.jsonl").exists()
    assert "is the --ckpt_dir" in _error(cks.reshard, str(env / "m"), str(env / "m"), 1, overwrite=True)
    kw = _train_kw(env, env / "arith")
    assert "holds the --train_file" in _error(train.main, **kw)
    assert data.read_bytes() == before and not (env / "m" / "p.jsonl").exists()


def test_an_existing_output_is_replaced_only_with_overwrite(env, tmp_path, dist1):
    job = dict(ckpt_dir=str(env / "m"), data_file=str(env / "arith" / "test.json"), template="none")
    o = tmp_path / "s.jsonl"
    infer.score(output_file=str(o), **job)
    first = o.read_text()
    o.write_text("mine")
    assert (
        _error(infer.score, output_file=str(o), **job)
        == f"--output_file {o} already exists; pass --overwrite True to replace it"
    )
    assert o.read_text() == "mine"
    infer.score(output_file=str(o), overwrite=True, **job)
    assert o.read_text() == first
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("x")
    assert "already exists and is not empty" in _error(train.main, **_train_kw(env, foreign))
    train.main(**_train_kw(env, foreign), overwrite=True)
    assert (foreign / "todo.txt").read_text() == "x" and (foreign / "checkpoint-2").is_dir()


# ----- the run signature ----------------------------------------------------------------------------------
def test_resume_refuses_another_run_naming_what_differs(env, tmp_path, dist1, capsys):
    kw = {**_train_kw(env, tmp_path / "s"), "max_steps": 6, "save_every": 2}
    train.main(**kw, exit_after_steps=2)
    ck = tmp_path / "s" / "checkpoint-2"
    for change, words in [
        (
            {"lr": 2e-3},
            "was written with --lr 0.001, not 0.002; resume with the flags the run started with, or pass --reset_schedule True",
        ),
        ({"max_batch_size": 2}, "was written with --max_batch_size 4, not 2"),
        ({"template": "default"}, "was written with --template 'none', not 'default'"),
        (
            {"objective": "step_by_step"},
            "was written by `train.py --objective sft`, not `train.py --objective step_by_step`",
        ),
    ]:
        msg = _error(train.main, **{**kw, **change}, resume=True)
        assert msg.startswith(f"--resume: {ck} ") and words in msg, msg
    moved = tmp_path / "moved.json"  # the same content elsewhere is the same input
    shutil.copy(env / "arith" / "train.json", moved)
    other = tmp_path / "other.json"
    records = json.load(open(moved))
    json.dump(records[::-1], open(other, "w"))
    assert f"--resume: --train_file {other} is not what {ck} was trained on" in _error(
        train.main, **{**kw, "train_file": str(other)}, resume=True
    )
    train.main(**{**kw, "train_file": str(moved)}, resume=True, exit_after_steps=4)
    capsys.readouterr()
    train.main(**{**kw, "lr": 2e-3}, resume=True, reset_schedule=True)
    assert "--reset_schedule: learning rate" in capsys.readouterr().out
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "s" / "metrics.jsonl")) if "lr" in r]
    # each step's lr is the cosine of its schedule at the steps before it (6 steps, no warm-up): the old
    # peak 1e-3 up to step 4, then the new peak 2e-3 at the step reached, 2e-3 * 0.5 * (1 + cos(pi * 4 / 6))
    assert abs(lrs[3] - 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 6))) < 1e-12
    assert abs(lrs[4] - 2e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 6))) < 1e-12
    assert "--reset_schedule True rebuilds the schedule of a resumed run" in _error(
        train.main, **kw, reset_schedule=True
    )


def test_generation_resume_refuses_other_weights(env, tmp_path, dist1):
    shutil.copytree(env / "m", tmp_path / "m")
    job = dict(
        ckpt_dir=str(tmp_path / "m"),
        data_file=str(env / "arith" / "test.json"),
        output_file=str(tmp_path / "o.jsonl"),
        template="none",
        max_new_tokens=4,
        progress=False,
    )
    infer.generate(**job)
    cks.init("tiny-llama", str(tmp_path / "m2"), n=1, tokenizer=str(env / "m" / "tokenizer.model"), seed=9)
    shutil.copy(tmp_path / "m2" / "consolidated.00.safetensors", tmp_path / "m" / "consolidated.00.safetensors")
    assert _error(infer.generate, **job).startswith(
        f"--output_file {tmp_path / 'o.jsonl'} was written by other weights: --ckpt_dir {tmp_path / 'm'} has changed"
    )
    infer.generate(**job, overwrite=True)  # starts afresh


# ----- what a file or a flag may hold ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,words",
    [
        ({"n_kv_heads": 0}, "n_kv_heads is 0; it must be a whole number >= 1"),
        ({"dim": "64"}, "dim is '64' (str); it must be a whole number >= 1"),
        ({"rope_scaling": "yes"}, "rope_scaling is 'yes'; it must be null or an object"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8}}, "rope_scaling of type llama3 lacks 'low_freq_factor'"),
        ({"max_seq_len": 0}, "max_seq_len is 0; it must be a whole number >= 2"),
        ({"norm_eps": float("nan")}, "norm_eps is nan; it must be a finite number > 0"),
        ({"qkv_bias": "no"}, "qkv_bias is 'no'; it must be true or false"),
        ({"n_experts": 2, "n_experts_per_tok": 3}, "n_experts_per_tok is 3, more than n_experts=2"),
        ({"vocab_size": None}, "vocab_size is None (NoneType)"),
    ],
)
def test_model_args_are_checked_naming_file_and_key(env, tmp_path, change, words):
    from engine.checkpoint import CheckpointError, open_checkpoint

    shutil.copytree(env / "m", tmp_path / "m")
    params = json.load(open(tmp_path / "m" / "params.json"))
    json.dump({**params, **change}, open(tmp_path / "m" / "params.json", "w"))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tmp_path / "m"))
    assert str(e.value).startswith(f"{tmp_path / 'm' / 'params.json'}: {words}"), str(e.value)


def test_hf_config_values_are_checked_naming_the_hf_key(tmp_path):
    from models.args import ConfigError
    from models.hf import args_from_hf_config

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 256,
        "intermediate_size": 96,
    }
    args_from_hf_config(cfg)
    for change, words in [
        ({"num_attention_heads": 0}, "config.json: num_attention_heads is 0; it must be a whole number >= 1"),
        ({"num_key_value_heads": 3}, "config.json: n_heads=4 is not a multiple of n_kv_heads=3"),
        ({"rope_theta": "big"}, "config.json: rope_theta is 'big'; it must be a finite number > 0"),
        ({"max_position_embeddings": -1}, "config.json: max_position_embeddings is -1"),
    ]:
        with pytest.raises(ConfigError) as e:
            args_from_hf_config({**cfg, **change})
        assert str(e.value).startswith(words), str(e.value)
    with pytest.raises(ConfigError, match="config.json lacks the key 'hidden_size'"):
        args_from_hf_config({k: v for k, v in cfg.items() if k != "hidden_size"})


def test_flag_values_that_cannot_mean_anything(env, tmp_path, dist1):
    kw = _train_kw(env, tmp_path / "s")
    lora = {"model_type": "lora-tiny-llama", "lora_rank": 4}
    for change, words in [
        ({**lora, "lora_alpha": 0}, "--lora_alpha must be a finite number > 0"),
        ({"lr": float("inf")}, "--lr must be a finite number, got inf"),
        ({"weight_decay": -1.0}, "--weight_decay must be >= 0, got -1.0"),
        ({"seed": 2**64}, "--seed must be a whole number from 0 to 4294967295"),
        ({"lora_dropout": 0.1}, "--lora_dropout 0.1 has no effect with --lora_rank -1"),
        ({"model_type": "lora-tiny-llama"}, "a lora- model type trains LoRA"),
        ({"eval_every": 5}, "--eval_every 5 evaluates on --label_file, which is not given"),
        (
            {"label_file": str(env / "arith" / "test.json"), "max_new_tokens": 511},
            "--max_new_tokens 511 leaves no room",
        ),
    ]:
        assert words in _error(train.main, **{**kw, **change}), change
    assert not (tmp_path / "s").exists()  # nothing ran
    job = dict(ckpt_dir=str(env / "m"), data_file=str(env / "arith" / "test.json"), output_file=str(tmp_path / "o"))
    for change, words in [
        ({"num_samples": 3}, "--num_samples 3 with --temperature 0 gives 3 identical greedy answers"),
        ({"top_p": 0.9}, "--top_p 0.9 has no effect with --temperature 0"),
        ({"temperature": 1.0, "top_p_bound": 64}, "--top_p_bound 64 has no effect without --top_p below 1"),
        ({"temperature": 1.0, "top_p": 0.9, "top_k": 5, "top_p_bound": 64},
         "--top_p_bound 64 has no effect with --top_k 5"),
        ({"temperature": 1.0, "top_p": 0.9, "top_p_bound": -1}, "--top_p_bound must be >= 0"),
        ({"temperature": 1e999}, "--temperature must be a finite number, got inf"),
        ({"seed": -1, "temperature": 1.0}, "--seed must be a whole number from 0"),
        ({"max_new_tokens": 600}, "--max_new_tokens 600 leaves no room for a prompt under the max_seq_len 512"),
    ]:
        assert words in _error(infer.generate, **job, **change), change
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"output": "the answer is 3", "label": "3"}]))
    assert "no record of" in _error(infer.evaluate, task="ARITH", predictions_file=str(preds), field="outptu")


def test_inference_refuses_nan_weights_and_adapters_of_another_base(env, tmp_path, dist1):
    poisoned_copy(env / "m", tmp_path / "nan", "layers.1.feed_forward.w2.weight", (3, 3), float("inf"))
    job = dict(data_file=str(env / "arith" / "test.json"), template="none", max_new_tokens=4, progress=False)
    assert "holds NaN or Inf weights (layers.1.feed_forward.w2.weight)" in _error(
        infer.generate, ckpt_dir=str(tmp_path / "nan"), output_file=str(tmp_path / "o"), **job
    )
    train.main(**_train_kw(env, tmp_path / "lora", model_type="lora-tiny-llama", lora_rank=2))
    cks.init("tiny-llama3", str(tmp_path / "other"), n=1, tokenizer=str(env / "m" / "tokenizer.model"))
    adapter = str(tmp_path / "lora" / "checkpoint-2")
    msg = _error(
        infer.generate, ckpt_dir=str(tmp_path / "other"), lora_dir=adapter, output_file=str(tmp_path / "p"), **job
    )
    assert f"{adapter} was trained on a different model than {tmp_path / 'other'}" in msg


def test_a_data_file_given_as_a_checkpoint(env, tmp_path, dist1):
    msg = _error(
        train.main,
        **_train_kw(env, tmp_path / "s"),
        objective="teacher_kl",
        teacher_ckpt_dir=str(env / "arith" / "test.json"),
    )
    assert msg.startswith(f"{env / 'arith' / 'test.json'} is a JSON file, not a checkpoint"), msg


def test_resume_falls_back_over_a_truncated_weight_file(env, tmp_path, dist1, capsys):
    kw = {**_train_kw(env, tmp_path / "s"), "max_steps": 6, "save_every": 2}
    train.main(**kw, exit_after_steps=4)
    shard = tmp_path / "s" / "checkpoint-4" / "consolidated.00.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a kill during the copy to a new disk
    train.main(**kw, resume=True)
    printed = capsys.readouterr().out
    assert "skipping checkpoint-4 (consolidated.00.safetensors is truncated" in printed
    assert f"resumed from {tmp_path / 's' / 'checkpoint-2'} at step 2" in printed


# ----- the engine reads what it writes; --help says what a flag takes ----------------------------------------
def test_json_lines_split_on_newlines_only(tmp_path):
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "g\x0bh\x0ci\x1cj"]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"instruction": t, "output": [t, t]}, ensure_ascii=False) + "\n" for t in texts))
    assert [r["instruction"] for r in read_records(str(path))] == texts


def test_help_names_each_type_once():
    from fire import helptext

    for fn in (train.main, infer.score, infer.generate):
        text = helptext.HelpText(fn)
        assert "Optional[Optional]" not in text and "Optional['" not in text
        assert "Type: Optional[str]" in text


def test_a_line_with_no_room_to_answer_counts_wrong(env, dist1):
    """train_implicit.py's decoding: a held-out line longer than the model is answered with nothing
    (scored wrong, as every unanswerable line), the others of its batch as they would be alone."""
    import torch

    from engine.checkpoint import load_model
    from engine.distill.implicit.decode import greedy_decode

    model = load_model(str(env / "m"), device=torch.device("cpu")).eval()
    short, long = [1, 5, 6, 7], [1] + [5] * 600  # the model's max_seq_len is 512
    alone = greedy_decode(model, [short], 2, 1, 4)
    assert greedy_decode(model, [short, long], 2, 1, 4) == [alone[0], []]
    assert greedy_decode(model, [long], 2, 1, 4) == [[]]


def test_a_teacher_run_resumed_as_another_stage_names_the_command(env, tmp_path, dist1):
    import train_implicit
    from data.multiplication import main as make_mult

    make_mult(str(tmp_path / "mult"), n=2, m=2, n_train=40, n_valid=0, n_test=0)
    common = dict(
        ckpt_dir=str(env / "m"), train_file=str(tmp_path / "mult" / "train.txt"), max_steps=2, max_batch_size=4
    )
    train_implicit.teacher(save_dir=str(tmp_path / "teacher"), **common)
    train_implicit.teacher(save_dir=str(tmp_path / "run"), **common, exit_after_steps=1, save_every=1)
    msg = _error(
        train_implicit.mind_read,
        save_dir=str(tmp_path / "run"),
        teacher_dir=str(tmp_path / "teacher"),
        resume=True,
        **common,
    )
    assert msg.startswith(
        f"--resume: {tmp_path / 'run' / 'checkpoint-1'} was written by `train_implicit.py teacher`, not "
        f"`train_implicit.py mind_read`"
    ), msg
