"""train.py: tensor/data-parallel equivalence, LoRA, exact resume, fp16 loss scaling, learning
an arithmetic task from scratch, DeepSpeed ZeRO, and one-sentence errors for bad input."""
import json
import os

import pytest
import torch

import checkpoint_split as cks
import train
from data.arithmetic import main as make_arith
from engine.runtime.errors import UserError
from tests.helpers import assert_same_run, losses, run_cli, torchrun, train_args


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("train")
    make_arith(str(root / "arith"), n_train=14, n_test=4, min_value=10, style="fixed", seed=1)
    models = {}
    for name in ("tiny-qwen2", "tiny-llama3", "tiny-mixtral"):
        cks.init(name, str(root / f"{name}-1"), n=1, tokenizer=tiny_tokenizer, seed=4)
        cks.split(str(root / f"{name}-1"), str(root / f"{name}-2"), n=2)
        models[name] = root / f"{name}-1", root / f"{name}-2"
    return root, models


@pytest.mark.processes
@pytest.mark.parametrize("name,extra", [
    ("tiny-qwen2", {"accumulation_steps": 2}),  # one KV head: replicated on both ranks, biases, tied embeddings
    ("tiny-mixtral", {}),  # experts sharded, router replicated
    ("tiny-llama3", {"model_type": "lora-tiny-llama3", "lora_rank": 4, "lora_alpha": 8}),
    ("tiny-llama3", {"model_type": "lora-tiny-llama3", "lora_rank": 4, "lora_targets": "wq,wv,output"}),  # vocab-sharded head
])
def test_tp2_equals_tp1(env, name, extra, dist1):
    root, models = env
    one, two = models[name]
    base = {"task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 1e-3, "max_steps": 3, "save_every": 3,
            "train_file": str(root / "arith" / "train.json"), "max_batch_size": 4, **extra}
    run = f"{name}-{len(extra)}-{extra.get('lora_targets', 'all')}"
    train.main(ckpt_dir=str(one), save_dir=str(root / f"{run}-tp1"), **base)
    torchrun("train.py", *train_args({**base, "ckpt_dir": two, "save_dir": root / f"{run}-tp2"}))
    assert_same_run(str(root / f"{run}-tp1"), str(root / f"{run}-tp2"), lora="lora_rank" in extra)


@pytest.mark.processes
def test_dp2_equals_one_process_with_twice_the_batch(env, dist1):
    root, models = env
    one, _ = models["tiny-llama3"]
    base = {"task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 1e-3, "max_steps": 3, "save_every": 3,
            "train_file": str(root / "arith" / "train.json"), "ckpt_dir": str(one), "accumulation_steps": 2}
    base["label_file"] = str(root / "arith" / "test.json")  # 4 records, evaluated in 2 slices under DP
    train.main(save_dir=str(root / "dp1"), max_batch_size=4, **base)
    torchrun("train.py", *train_args({**base, "save_dir": root / "dp2", "max_batch_size": 4, "tp_size": 1}))
    assert_same_run(str(root / "dp1"), str(root / "dp2"))
    evals = [[json.loads(line) for line in open(root / d / "metrics.jsonl") if '"eval"' in line] for d in ("dp1", "dp2")]
    assert [(e["total"], e["correct"]) for e in evals[0]] == [(e["total"], e["correct"]) for e in evals[1]]
    assert evals[1][-1]["total"] == 4


@pytest.mark.processes
def test_resume_continues_the_loss_curve_exactly(env):
    """LoRA with dropout at TP=2: stopped after 4 of 7 steps (mid-epoch) and resumed, the losses
    match the uninterrupted run step for step (RNG, optimizer, schedule, data position restored)."""
    root, models = env
    _, two = models["tiny-llama3"]
    base = {"task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 2e-3, "max_steps": 7,
            "train_file": root / "arith" / "train.json", "ckpt_dir": two, "max_batch_size": 4,
            "model_type": "lora-tiny-llama3", "lora_rank": 4, "lora_dropout": 0.2, "save_every": 2,
            "warmup_steps": 2}
    torchrun("train.py", *train_args({**base, "save_dir": root / "straight"}))
    torchrun("train.py", *train_args({**base, "save_dir": root / "stopped", "exit_after_steps": 4}))
    assert len(losses(root / "stopped")) == 4
    torchrun("train.py", *train_args({**base, "save_dir": root / "stopped", "resume": True}))
    a, b = losses(root / "straight"), losses(root / "stopped")
    assert len(a) == len(b) == 7
    assert a == b, (a, b)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(env, dist1, tiny_tokenizer):
    from engine.distill.sft import SFTData, SFTTask
    from engine.text.records import read_records
    from engine.text.tokenizer import load_tokenizer
    from engine.train.launch import build_model
    from engine.train.trainer import TrainConfig, Trainer

    root, models = env
    one, _ = models["tiny-llama3"]
    model, _ = build_model(str(one), None, -1, None, 0.0, "wq", torch.float16, dist1)
    tok = load_tokenizer(str(one))
    data = SFTData(read_records(str(root / "arith" / "train.json")), tok, 64, "none")
    task = SFTTask(data, dist1.device)
    real = task.loss_sums
    calls = []

    def overflow_once(m, batch):
        sums = real(m, batch)
        calls.append(1)
        return {"ce": sums["ce"] * float("inf")} if len(calls) == 1 else sums

    task.loss_sums = overflow_once
    cfg = TrainConfig(save_dir=str(root / "fp16"), max_batch_size=4, lr=1e-3, max_steps=2, use_float16=True,
                      progress=False, plot=False)
    trainer = Trainer(model, task, cfg, dist1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale0 = trainer.scaler.scale
    first = trainer._optimizer_step([[0, 1, 2, 3]])
    assert first["skipped"] and trainer.scaler.scale == scale0 / 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    second = trainer._optimizer_step([[4, 5, 6, 7]])
    assert not second["skipped"] and trainer.scaler.scale == scale0 / 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert trainer.scheduler.last_epoch == 1  # the skipped step did not advance the schedule


@pytest.mark.processes
def test_learns_arithmetic_from_scratch_at_tp2(tmp_path, tiny_tokenizer):
    """A tiny LLaMA trained from random weights through train.py under torchrun (TP=2) adds
    two-digit numbers it never saw with > 90% exact-match accuracy."""
    make_arith(str(tmp_path / "data"), n_train=4000, n_test=200, min_value=10, style="fixed", seed=0)
    cks.init("tiny-llama", str(tmp_path / "init"), n=2, tokenizer=tiny_tokenizer, seed=0)
    torchrun("train.py", "--task", "ARITH", "--ckpt_dir", str(tmp_path / "init"), "--save_dir", str(tmp_path / "run"),
             "--train_file", str(tmp_path / "data" / "train.json"), "--label_file", str(tmp_path / "data" / "test.json"),
             "--max_batch_size", "32", "--max_steps", "1250", "--lr", "5e-3", "--warmup_steps", "50",
             "--template", "none", "--max_seq_len", "64", "--max_new_tokens", "40", "--eval_batch_size", "200",
             "--log_every", "25", timeout=900)
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"eval"' in line]
    final = evals[-1]
    print(f"ARITH accuracy after {final['step']} steps: {final['accuracy']:.3f} ({final['correct']}/{final['total']})")
    assert final["total"] == 200 and final["accuracy"] > 0.9
    assert os.path.exists(tmp_path / "run" / "curves.png")
    best = json.load(open(tmp_path / "run" / "best" / "eval.json"))
    assert best["accuracy"] == max(e["accuracy"] for e in evals)


# ----- bad input -----------------------------------------------------------------------------
def test_bad_training_input(env, tmp_path, dist1):
    root, models = env
    one, two = models["tiny-llama3"]
    good = str(root / "arith" / "train.json")
    base = dict(task="ARITH", ckpt_dir=str(one), save_dir=str(tmp_path / "s"), train_file=good, template="none",
                max_steps=1, max_seq_len=64)

    def err(**kw):
        with pytest.raises(UserError) as e:
            train.main(**{**base, **kw})
        assert "\n" not in str(e.value)
        return str(e.value)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q2"}]))
    assert err(train_file=str(bad)) == f"{bad} record 1 lacks the key 'output'"
    bad.write_text(json.dumps([{"instruction": "q", "output": 3}]))
    assert "record 0" in err(train_file=str(bad)) and "'output'" in err(train_file=str(bad))
    bad.write_text(json.dumps([{"instruction": 5, "output": "a"}]))
    assert "record 0: 'instruction' must be a string" in err(train_file=str(bad))
    bad.write_text("")
    assert err(train_file=str(bad)) == f"{bad} is empty"
    bad.write_text("[]")
    assert "holds no records" in err(train_file=str(bad))
    assert "every prompt" in err(max_seq_len=4)
    assert "cannot both be True" in err(use_float16=True, use_bfloat16=True)
    assert "unknown" in err(task="MATHS")
    # 2 shards in one process are resharded on load (no longer refused): the 1-shard model's run
    for name, ckpt in (("one", one), ("two", two)):
        train.main(**{**base, "ckpt_dir": str(ckpt), "save_dir": str(tmp_path / name), "max_steps": 2})
    assert len(losses(tmp_path / "one")) == 2 and losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-6)


def test_resume_refuses_another_run(env, tmp_path, dist1):
    root, models = env
    one, _ = models["tiny-llama3"]
    q_one, _ = models["tiny-qwen2"]
    base = dict(task="ARITH", save_dir=str(tmp_path / "r"), train_file=str(root / "arith" / "train.json"),
                template="none", max_steps=1, max_seq_len=64, max_batch_size=2)
    train.main(ckpt_dir=str(one), **base)
    with pytest.raises(UserError, match="already holds checkpoints"):
        train.main(ckpt_dir=str(one), **base)
    with pytest.raises(UserError, match=f"--resume: --ckpt_dir {q_one} is not what .* was trained on"):
        train.main(ckpt_dir=str(q_one), resume=True, **base)
    with pytest.raises(UserError, match="was written with --model_type None, not 'lora-tiny-llama3'"):
        train.main(ckpt_dir=str(one), resume=True, model_type="lora-tiny-llama3", lora_rank=2, **base)


@pytest.mark.processes
def test_batch_must_split_over_data_parallel_ranks(env, tmp_path):
    root, models = env
    one, _ = models["tiny-llama3"]
    proc = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", "--task", "ARITH",
                   "--ckpt_dir", str(one), "--save_dir", str(tmp_path / "x"), "--train_file",
                   str(root / "arith" / "train.json"), "--max_batch_size", "3", "--tp_size", "1")
    assert proc.returncode != 0
    assert "error: --max_batch_size=3 is not divisible by the 2 data-parallel replicas" in proc.stderr


@pytest.mark.processes
@pytest.mark.parametrize("stage", [1])
def test_deepspeed_zero_matches_the_plain_run(env, stage, tmp_path):
    """ZeRO over 2 data-parallel CPU processes (gloo) gives the plain data-parallel losses and weights."""
    root, models = env
    one, _ = models["tiny-llama3"]
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    base = {"task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 1e-3, "max_steps": 3, "save_every": 3,
            "train_file": root / "arith" / "train.json", "ckpt_dir": one, "accumulation_steps": 2,
            "max_batch_size": 4, "tp_size": 1}
    torchrun("train.py", *train_args({**base, "save_dir": tmp_path / "plain"}))
    torchrun("train.py", *train_args({**base, "save_dir": tmp_path / "zero", "deepspeed": cfg}),
             env={"DS_ACCELERATOR": "cpu"})
    assert os.path.isdir(tmp_path / "zero" / "checkpoint-3" / "deepspeed")
    assert_same_run(str(tmp_path / "plain"), str(tmp_path / "zero"))


def test_activation_checkpointing_and_bf16(env, dist1):
    """Recomputing activations changes memory, not results; bf16 autocast stays close to fp32."""
    from engine.distill.sft import SFTData
    from engine.text.records import read_records
    from engine.text.sequences import pad_batch
    from engine.text.tokenizer import load_tokenizer
    from engine.train.launch import build_model
    from models.vocab_parallel import token_cross_entropy

    root, models = env
    one, _ = models["tiny-mixtral"]
    tok = load_tokenizer(str(one))
    data = SFTData(read_records(str(root / "arith" / "train.json")), tok, 64, "none")
    x, y = pad_batch([data.example(i, 0) for i in range(4)], tok.padding_id)
    results = {}
    for ckpt in (False, True, ("selective", 1.0), ("full", 0.5), ("selective", 0.5)):
        model, _ = build_model(str(one), None, -1, None, 0.0, "wq", torch.float32, dist1)
        if isinstance(ckpt, tuple):
            model.configure_layers(*ckpt)
            assert model.checkpoint_policy == (ckpt[0], round(ckpt[1] * len(model.layers)))
        else:
            model.gradient_checkpointing = ckpt
        loss = token_cross_entropy(model(x, gather=False), y)
        loss.backward()
        results[ckpt] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()]))
    for ckpt in results:
        assert abs(results[ckpt][0] - results[False][0]) <= 1e-6, ckpt
        assert (results[ckpt][1] - results[False][1]).abs().max() <= 1e-6, ckpt
    # what each policy recomputes in backward: full re-runs the matmuls, selective only cheap ops
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    backward_ops = {}
    for policy in ("none", "full", "selective"):
        model, _ = build_model(str(one), None, -1, None, 0.0, "wq", torch.float32, dist1)
        model.configure_layers(policy)
        loss = token_cross_entropy(model(x, gather=False), y)
        with Count() as counter:
            loss.backward()
        backward_ops[policy] = counter.ops
    mm = {p: ops.get("mm", 0) for p, ops in backward_ops.items()}
    silu = {p: ops.get("silu", 0) for p, ops in backward_ops.items()}
    assert mm["selective"] == mm["none"] < mm["full"], mm
    assert silu["none"] == 0 < silu["selective"] == silu["full"], silu
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = token_cross_entropy(model(x, gather=False), y)
    assert abs(float(loss16) - results[False][0]) / results[False][0] < 2e-2


@pytest.mark.processes
def test_chunked_head_loss_equals_plain_loss_tp1_and_tp2(tmp_path, dist1):
    """The output projection + cross-entropy computed chunk by chunk (no full logits) returns the
    plain loss's sum and gradients, whatever the chunk size, at TP=1 and TP=2."""
    from tests.model_checks import head_loss_grads

    one = head_loss_grads()
    torchrun("tests/workers/loss_worker.py", str(tmp_path / "tp2.pt"))
    two = torch.load(tmp_path / "tp2.pt")
    ref = one["plain"]
    for results in (one, two):
        for name, r in results.items():
            assert abs(r["loss"] - ref["loss"]) <= 1e-4 * abs(ref["loss"]), name
            assert (r["grad_h"] - ref["grad_h"]).abs().max() <= 1e-5, name
            assert r["grad_w"].shape == ref["grad_w"].shape
            assert (r["grad_w"] - ref["grad_w"]).abs().max() <= 1e-5, name


@pytest.mark.processes
@pytest.mark.parametrize("tp", [1, 2])
def test_compiled_blocks_equal_eager(env, tp, dist1, capfd):
    """Regional torch.compile (inductor; every block compiled alone, TP all-reduces inside as
    functional collectives) trains to the same losses and weights as eager: full fine-tuning with
    activation checkpointing at TP=1, LoRA at TP=2."""
    root, models = env
    one, two = models["tiny-llama3"]
    base = {"task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 1e-3, "max_steps": 3, "save_every": 3,
            "train_file": str(root / "arith" / "train.json"), "max_batch_size": 4}
    if tp == 2:
        base.update(model_type="lora-tiny-llama3", lora_rank=4, lora_alpha=8)
    else:
        base.update(checkpoint_activations="selective")
    runs = {}
    for compile_ in (False, True):
        save = root / f"compile-{compile_}-tp{tp}"
        if tp == 1:
            train.main(ckpt_dir=str(one), save_dir=str(save), compile=compile_, **base)
            out = capfd.readouterr()
            runs[compile_] = out.out + out.err
        else:
            out = torchrun("train.py", *train_args({**base, "ckpt_dir": two, "save_dir": save, "compile": compile_}))
            runs[compile_] = out.stdout + out.stderr
    assert_same_run(str(root / f"compile-False-tp{tp}"), str(root / f"compile-True-tp{tp}"), lora=tp == 2)
    assert "decoder blocks compiled" in runs[True] and "eager decoder blocks (--compile False)" in runs[False]
    assert "torch.compile failed" not in runs[True]
