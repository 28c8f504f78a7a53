"""train.py --objective on_policy (GKD) and --divergence: the divergences against TRL's definition written
out here in float64 (TP=1 and TP=2), --lmbda 0 equal to teacher_kl --kl_weight 1, a teacher equal to the
student, the student's samples equal to infer.py's from a checkpoint of the same weights and following
the weights after each optimizer step (the decode path reused across steps), TP=2 == TP=1 through the
CLI, exact resume of losses and samples, the metrics, and every refused input."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import checkpoint_split as cks
import infer
import train
from data.arithmetic import main as make_arith
from engine.distill.on_policy.sampling import STUDENT, step_seed, writer_of
from engine.runtime.errors import UserError
from tests.helpers import assert_same_run, full_weights, losses, teacher_and_students, torchrun, train_args

BASE = {"task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 1e-2, "max_steps": 3, "save_every": 3,
        "max_batch_size": 4, "objective": "on_policy", "max_new_tokens": 12}


def metrics(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl")) if '"eval"' not in line]


def samples(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "samples.jsonl"))]


def run(**flags):
    train.main(**{k: str(v) if isinstance(v, os.PathLike) else v for k, v in {**BASE, **flags}.items()})
    return str(flags["save_dir"])


# ----- the divergences against TRL's definition ---------------------------------------------------
def trl_generalized_jsd(student_logits, teacher_log_probs, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (trl 1.16.0, trl/experimental/gkd/gkd_trainer.py:238-318),
    summed over rows (its reduction='sum', no labels): student logits / T and log-softmax (:271-276; the
    caller gives the teacher's log-probabilities at T the same way); beta 0: KL(teacher || student)
    (:278-279); beta 1: KL(student || teacher) (:280-281); else the mixture in log space,
    logsumexp(student + log1p(-beta), teacher + log(beta)) (:286-289), and beta KL(teacher || m) +
    (1 - beta) KL(student || m) (:293-297, F.kl_div(input, target) being KL(target || input)). Written with
    0 log 0 = 0 so that a sparse teacher (log p = -inf) works, which F.kl_div cannot give."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = teacher_log_probs

    def kl(log_a, log_b):  # KL(a || b) = sum a (log a - log b), 0 where a = 0
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum()

    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    b = torch.tensor(beta, dtype=s.dtype)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    return b * kl(t, m) + (1 - b) * kl(s, m)


@pytest.mark.processes
def test_divergences_against_trl_in_float64_at_tp1_and_tp2(dist1, tmp_path):
    """Every divergence (forward KL, reverse KL, the JSD at beta 0.5, 0.1 and its ends 0 and 1), dense at
    T=1 and T=1.7, and the JSD and forward KL against a sparse top-k target: value and gradients (hidden
    states and head) of T^2 x TRL's divergence in float64, chunked and from logits, at TP=1 and TP=2."""
    from tests.kl_checks import DIVERGENCE_CASES, divergence_grads, kl_inputs

    hidden, weight, t_hidden, t_weight, ids, probs = kl_inputs()
    sparse = torch.zeros(len(ids), weight.shape[0], dtype=torch.float64)
    for r in range(len(ids)):
        for c in range(ids.shape[1]):
            if ids[r, c] >= 0:
                sparse[r, ids[r, c]] += float(probs[r, c])
    refs = {}
    for name, divergence, beta, temperature, target in DIVERGENCE_CASES:
        h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
        b = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)
        if target == "dense":  # the teacher's logits at T, as TRL
            teacher = F.log_softmax(t_hidden.double() @ t_weight.double().t() / temperature, dim=-1)
        else:  # a top-k target is already the teacher's probabilities at T (teachers.sparse_probs)
            teacher = torch.where(sparse > 0, sparse.clamp(min=1e-300).log(), float("-inf"))
        loss = temperature ** 2 * trl_generalized_jsd(h @ w.t(), teacher, b, temperature)
        loss.backward()
        refs[name] = {"loss": loss.item(), "grad_h": h.grad.float(), "grad_w": w.grad.float()}
    one = divergence_grads()
    torchrun("tests/workers/kl_worker.py", str(tmp_path / "tp2.pt"), "divergences")
    two = torch.load(tmp_path / "tp2.pt")
    worst = {"loss": 0.0, "grad": 0.0}
    for results in (one, two):
        assert len(results) == 2 * len(DIVERGENCE_CASES)
        for key, r in results.items():
            ref = refs[key.split("/")[0]]
            worst["loss"] = max(worst["loss"], abs(r["loss"] - ref["loss"]) / abs(ref["loss"]))
            worst["grad"] = max(worst["grad"], (r["grad_h"] - ref["grad_h"]).abs().max().item(),
                                (r["grad_w"] - ref["grad_w"]).abs().max().item())
    print(f"divergences vs TRL's (float64), TP=1 and TP=2: loss rel. error {worst['loss']:.1e}, grads {worst['grad']:.1e}")
    assert worst["loss"] <= 1e-5 and worst["grad"] <= 1e-5, worst
    assert refs["jsd-b0.1-T1.0-dense"]["loss"] != pytest.approx(refs["jsd-b0.5-T1.0-dense"]["loss"], rel=1e-2)


# ----- the trainer -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer):
    """A student (tiny-llama) and a teacher of another family with the same tokenizer (tiny-qwen2: tied
    head, one KV head), in 1 and 2 shards; a teacher with another tokenizer (and vocabulary size)."""
    root = tmp_path_factory.mktemp("on_policy")
    make_arith(str(root / "arith"), n_train=8, n_test=4, min_value=10, style="fixed", seed=1)
    models = teacher_and_students(root, tiny_tokenizer, (("student", "tiny-llama", False),
                                                         ("teacher", "tiny-qwen2", False), ("other", "tiny-llama", True)))
    return root, models


def _flags(env, tp=1, **extra):
    root, models = env
    return {"train_file": root / "arith" / "train.json", "ckpt_dir": models["student"][tp - 1],
            "teacher_ckpt_dir": models["teacher"][tp - 1], **extra}


def test_lmbda_0_equals_teacher_kl_with_kl_weight_1(env, dist1):
    """--lmbda 0 --divergence forward_kl is supervised KD: step for step teacher_kl --kl_weight 1 (the same
    online teacher, its full distribution): the same losses and updated weights."""
    root, _ = env
    a = run(**_flags(env, lmbda=0, divergence="forward_kl", kl_temperature=1.5, save_dir=root / "kd-on_policy"))
    b = run(**_flags(env, objective="teacher_kl", kl_weight=1, kl_temperature=1.5, save_dir=root / "kd-teacher_kl"))
    assert_same_run(a, b, tol=1e-6)
    assert all(m["on_policy_fraction"] == 0 and m["generated_tokens"] == 0 for m in metrics(a))
    assert [m["loss"] for m in metrics(a)] == pytest.approx([m["loss_kl"] for m in metrics(b)], abs=1e-6)


def test_teacher_kl_divergence_flag_reaches_its_loss(env, dist1):
    """teacher_kl --divergence reverse_kl --kl_weight 1 trains what on_policy --lmbda 0 --divergence
    reverse_kl does, and not what forward KL does."""
    root, _ = env
    a = run(**_flags(env, lmbda=0, divergence="reverse_kl", save_dir=root / "rkl-on_policy"))
    b = run(**_flags(env, objective="teacher_kl", kl_weight=1, divergence="reverse_kl", save_dir=root / "rkl-tkl"))
    c = run(**_flags(env, objective="teacher_kl", kl_weight=1, save_dir=root / "fkl-tkl"))
    assert_same_run(a, b, tol=1e-6)
    assert abs(losses(b)[0] - losses(c)[0]) > 1e-4 * losses(c)[0], (losses(b), losses(c))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_equal_to_the_student_gives_divergence_0_and_no_gradient(env, dist1, divergence):
    root, models = env
    save = run(**_flags(env, teacher_ckpt_dir=models["student"][0], divergence=divergence, jsd_beta=0.3,
                        kl_temperature=1.3, max_steps=1, save_every=1, save_dir=root / f"self-{divergence}"))
    first = metrics(save)[0]
    assert first["on_policy_fraction"] == 1 and first["generated_tokens"] > 0
    assert abs(first["loss"]) <= 1e-9 and first["grad_norm"] <= 1e-6, first


GEN = {"temperature": 0.8, "top_p": 0.95}  # the sampling of test_samples_equal_infer_py_and_follow_the_weights


def _infer_samples(env, tmp_path, ckpt_dir, seed, name, lora_dir=None):
    """{(record, sample): tokens} infer.py samples from a checkpoint with --seed seed, as a user would."""
    root, _ = env
    out = tmp_path / f"{name}.jsonl"
    infer.generate(ckpt_dir=str(ckpt_dir), lora_dir=lora_dir, data_file=str(root / "arith" / "train.json"),
                   output_file=str(out), temperature=GEN["temperature"], top_p=GEN["top_p"], num_samples=2, seed=seed,
                   max_new_tokens=BASE["max_new_tokens"], template="none", batch_size=8, output_tokens=True,
                   progress=False)
    return {(line["index"], k): tokens for line in map(json.loads, open(out)) for k, tokens in enumerate(line["tokens"])}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_samples_equal_infer_py_and_follow_the_weights(env, dist1, tmp_path, mode):
    """The student's samples of step 1 equal infer.py's from the starting checkpoint with the step's
    seed; those of step 2 equal infer.py's from checkpoint-1 (the weights after one optimizer step; with
    LoRA the adapter, unmerged in training, merged by infer.py) and differ from the starting weights'."""
    root, models = env
    extra = {"model_type": "lora-tiny-llama", "lora_rank": 4} if mode == "lora" else {}
    save = run(**_flags(env, divergence="jsd", num_samples=2, gen_temperature=GEN["temperature"],
                        gen_top_p=GEN["top_p"], max_steps=2, save_every=1, save_samples=True,
                        save_dir=tmp_path / "run", **extra))
    by_step = {}
    for line in samples(save):
        assert line["writer"] == STUDENT and line["seed"] == step_seed(0, STUDENT, line["step"])
        by_step.setdefault(line["step"], {})[(line["record"], line["sample"])] = line["tokens"]
    assert sorted(by_step) == [1, 2] and all(len(v) == 8 for v in by_step.values())
    for line in metrics(save):  # every sampled token is a trained position (no cut at max_seq_len here)
        mine = by_step[line["step"]].values()
        assert line["generated_tokens"] == sum(map(len, mine)) and line["on_policy_fraction"] == 1
        assert line["response_length"] == pytest.approx(line["generated_tokens"] / len(mine))
    start = models["student"][0]
    first = _infer_samples(env, tmp_path, start, step_seed(0, STUDENT, 1), "start-seed1")
    assert all(first[key] == tokens for key, tokens in by_step[1].items())
    if mode == "lora":
        after = _infer_samples(env, tmp_path, start, step_seed(0, STUDENT, 2), "ckpt1", str(tmp_path / "run" / "checkpoint-1"))
    else:
        after = _infer_samples(env, tmp_path, tmp_path / "run" / "checkpoint-1", step_seed(0, STUDENT, 2), "ckpt1")
    stale = _infer_samples(env, tmp_path, start, step_seed(0, STUDENT, 2), "start-seed2")
    assert all(after[key] == tokens for key, tokens in by_step[2].items())
    changed = sum(stale[key] != tokens for key, tokens in by_step[2].items())
    print(f"{mode}: step 2's samples equal infer.py's from checkpoint-1; {changed}/8 differ from the starting weights'")
    assert changed >= 2


def test_the_decode_path_sees_the_weights_after_each_optimizer_step(dist1, tiny_tokenizer, tmp_path):
    """One Sampler (its runner, KV cache and slot state made once, here the static-shape step a CUDA graph
    captures) across an in-place optimizer step samples what a fresh decoder does on the new weights,
    not what it sampled before. tests/test_cuda.py runs the same through CUDA graphs on a GPU."""
    from engine.checkpoint import load_model
    from engine.distill.on_policy.sampling import Sampler
    from engine.infer.generation import SamplingParams, StaticSteps
    from engine.text.tokenizer import load_tokenizer

    cks.init("tiny-llama", str(tmp_path / "m"), n=1, tokenizer=tiny_tokenizer, seed=3)
    model = load_model(str(tmp_path / "m"), dtype=torch.float32, device=torch.device("cpu")).train()
    tok = load_tokenizer(str(tmp_path / "m"))
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    prompts = [tok.encode(q) for q in ("What is 12 + 30 ?", "What is 7 + 41 ?", "What is 55 + 5 ?")]
    seeds = [11, 12, 13]
    reused = Sampler(model, params, 4, 32, [tok.eos_id])
    reused.runner = StaticSteps(model)
    before = reused.sample(prompts, seeds)
    assert model.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    x = torch.tensor([prompts[0]])
    model.logits(model.forward_hidden(x)).logsumexp(-1).mean().backward()
    optimizer.step()
    again = reused.sample(prompts, seeds)
    fresh = Sampler(model, params, 4, 32, [tok.eos_id])
    fresh.runner = StaticSteps(model)
    assert again == fresh.sample(prompts, seeds)
    assert again != before


@pytest.mark.processes
def test_tp2_equals_tp1_through_the_cli(env, dist1):
    """3 steps of 2 micro-batches, a fraction 0.5 sampled by the student and the others by the teacher
    (--seq_kd), 2 samples per prompt, the JSD at a temperature (0.5): TP=2 (torchrun) gives TP=1's losses,
    updated weights and samples; the metrics agree with the samples file; curves.png is written."""
    root, _ = env
    runs = {}
    for tp in (1, 2):
        # lr 1e-3: Adam turns the float noise of near-zero gradients into updates of the order of lr
        args = {**BASE, **_flags(env, tp, lmbda=0.5, seq_kd=True, num_samples=2, divergence="jsd", jsd_beta=0.3,
                                  kl_temperature=0.5, accumulation_steps=2, max_batch_size=2, save_samples=True,
                                  lr=1e-3, save_dir=root / f"tp{tp}")}
        if tp == 1:
            run(**args)
        else:
            torchrun("train.py", *train_args(args))
        runs[tp] = str(args["save_dir"])
    assert_same_run(runs[1], runs[2])
    assert samples(runs[1]) == samples(runs[2])
    lines, sampled = metrics(runs[2]), samples(runs[2])
    writers = [writer_of(0, s, m, 0.5, True) for s in (1, 2, 3) for m in (0, 1)]
    assert {"student", "teacher"} <= set(writers) and {line["writer"] for line in sampled} == set(writers)
    for line in lines:
        mine = [x for x in sampled if x["step"] == line["step"]]
        assert line["generated_tokens"] == sum(len(x["tokens"]) for x in mine)
        assert line["on_policy_fraction"] == writers[2 * line["step"] - 2:2 * line["step"]].count("student") / 2
        assert line["time_generation_s"] > 0 and line["time_teacher_s"] > 0 and line["time_student_s"] > 0
    assert os.path.getsize(os.path.join(runs[2], "curves.png")) > 0


def test_resume_gives_the_same_losses_and_samples(env, dist1):
    """Stopped after 3 of 4 steps, its last checkpoint at step 2, and resumed with --resume True (step 3 runs
    again; --seq_kd so that every step writes samples): the losses, the samples of every step (step 3's once)
    and the final weights are those of the uninterrupted run."""
    root, _ = env
    common = _flags(env, lmbda=0.5, seq_kd=True, divergence="jsd", max_steps=4, save_every=2, save_samples=True)
    whole = run(**common, save_dir=root / "whole")  # every step has samples: the student's or the teacher's
    stopped = run(**common, save_dir=root / "stopped", exit_after_steps=3)
    assert len(metrics(stopped)) == 3 and 3 in {s["step"] for s in samples(stopped)}
    assert not os.path.exists(os.path.join(stopped, "checkpoint-3"))  # the resume starts at step 3 again
    run(**common, save_dir=root / "stopped", resume=True)
    keys = ("step", "loss", "grad_norm", "on_policy_fraction", "generated_tokens", "response_length")
    assert [{k: m[k] for k in keys} for m in metrics(stopped)] == [{k: m[k] for k in keys} for m in metrics(whole)]
    assert samples(stopped) == samples(whole) and {s["step"] for s in samples(whole)}
    wa, wb = (full_weights(os.path.join(d, "checkpoint-4")) for d in (whole, stopped))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_refused_input(env, dist1, tmp_path):
    root, models = env

    def err(**kw):
        with pytest.raises(UserError) as e:
            run(**{**_flags(env, save_dir=tmp_path / "s", max_steps=1), **kw})
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "needs --teacher_ckpt_dir" in err(teacher_ckpt_dir=None)
    assert err(self_distill=True).startswith("--self_distill True: on-policy distillation needs a teacher")
    assert err(teacher_ckpt_dir=str(root / "absent")) == f"--teacher_ckpt_dir {root / 'absent'} does not exist"
    assert err(lmbda=1.5) == "--lmbda must be in [0, 1], got 1.5"
    assert err(jsd_beta=-0.1) == "--jsd_beta must be in [0, 1], got -0.1"
    assert err(divergence="tvd") == "--divergence 'tvd' is not one of forward_kl, reverse_kl, jsd"
    assert err(kl_temperature=0.0) == "--kl_temperature must be > 0, got 0.0"
    assert err(gen_temperature=-1.0) == "--gen_temperature must be >= 0, got -1.0"
    assert err(gen_top_p=0.0) == "--gen_top_p must be in (0, 1], got 0.0"
    assert err(num_samples=0) == "--num_samples must be >= 1, got 0"
    assert "but --lmbda 1 has the student sample them all" in err(seq_kd=True, lmbda=1.0)
    other = err(teacher_ckpt_dir=str(models["other"][0]))
    student_vocab = json.load(open(models["student"][0] / "params.json"))["vocab_size"]
    other_vocab = json.load(open(models["other"][0] / "params.json"))["vocab_size"]
    assert student_vocab != other_vocab
    assert other == (f"--objective on_policy compares the teacher's and the student's next-token distributions "
                     f"token by token, but the model in --teacher_ckpt_dir {models['other'][0]} has a vocabulary of "
                     f"{other_vocab} and the student {student_vocab}"), other
    # teacher_kl's --divergence: reverse KL needs the full distribution
    kl = {"objective": "teacher_kl", "divergence": "reverse_kl"}
    assert "not a top k" in err(**kl, teacher_top_k=5)
    assert "use --eos_target teacher" in err(**kl, eos_target="one_hot")
    assert "not a top k" in err(objective="teacher_kl", divergence="jsd", jsd_beta=1.0, teacher_top_k=5)
    assert "its tokenizer differs from the student's" in err(**kl, teacher_ckpt_dir=str(models["other"][0]))
    assert "use --divergence forward_kl" in err(objective="teacher_kl", divergence="jsd", teacher_probs="raw")
    for flag in ("lmbda", "seq_kd", "gen_temperature", "num_samples"):
        assert f"--{flag} belongs to --objective on_policy, not teacher_kl" in err(objective="teacher_kl",
                                                                                   **{flag: 1})


def test_curves_plot_an_objectives_own_numbers(tmp_path):
    """Keys an objective adds to a step line get panels, grouped by their prefix."""
    from engine.runtime.plotting import _extra_panels

    steps = [{"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 5.0, "on_policy_fraction": 0.5,
              "generated_tokens": 10, "time_generation_s": 1.0, "time_teacher_s": 2.0, "skipped": False}]
    assert sorted(_extra_panels(steps)) == [("generated_tokens", ["generated_tokens"]),
                                            ("on_policy_fraction", ["on_policy_fraction"]),
                                            ("time", ["time_generation_s", "time_teacher_s"])]
