"""Distilling step-by-step and the mutual-information term: each loss against a reference written
here, TP=2 == TP=1, --beta 0 / --alpha 1, the CLI end to end under torchrun (train, resume,
evaluate, calibration, BLEU), the step-by-step data converter, SVAMP equations, ECE and BLEU
against hand computations, and one-sentence errors for bad input."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import checkpoint_split as cks
import infer
import train
from data.arithmetic import main as make_arith
from data.prepare_step_by_step import main as prepare_main, parse_teacher_output
from engine.distill.step_by_step.mi import infonce_sum, masked_mean_pool, pooled_distribution_ce_sum
from engine.infer.metrics import calibration_bins, corpus_bleu, tokenize_13a
from engine.runtime.errors import UserError
from engine.text.answers import extract_answer, is_correct, parse_label
from tests.helpers import assert_same_run, losses, run_cli, torchrun, train_args
from tests.workers.mi_worker import hand_made_mi_inputs, mi_loss_grads

PREFIX = {"label": "predict: ", "rationale": "explain: "}  # the authors' T5 task prefixes, written out here


@pytest.fixture(scope="module")
def sbs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("sbs")
    make_arith(str(root / "arith"), n_train=12, n_test=4, min_value=10, style="fixed", seed=2)
    cks.init("tiny-llama", str(root / "m1"), n=1, tokenizer=tiny_tokenizer, seed=3)
    cks.split(str(root / "m1"), str(root / "m2"), n=2)
    return root


def _base(root, **kw):
    return {"objective": "step_by_step", "task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 1e-3,
            "max_steps": 3, "save_every": 3, "train_file": str(root / "arith" / "train.json"), "max_batch_size": 4,
            **kw}


def _metrics(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]


# ----- the losses against references written here -------------------------------------------------
def _reference_pooled(logits, mask):
    """Our pooled_distribution_ce's pooling, from its definition: softmax per real position, max over
    the real positions, renormalised."""
    probs = torch.softmax(logits[mask], dim=-1)
    pooled = probs.max(dim=0).values
    return pooled / pooled.sum()


def test_pooled_distribution_ce_matches_a_reference_and_ignores_padding(dist1):
    label, label_mask, rationale, rationale_mask = hand_made_mi_inputs()
    label, rationale = label.clone().requires_grad_(), rationale.clone().requires_grad_()
    got = pooled_distribution_ce_sum(label, label_mask, rationale, rationale_mask)
    ref = torch.zeros(())
    for b in range(len(label)):
        if not label_mask[b].any():
            continue  # row 3: no real label position, no term
        p = _reference_pooled(label[b].detach(), label_mask[b])
        q = _reference_pooled(rationale[b], rationale_mask[b])
        ref = ref + -(p * q.log()).sum()
    assert abs(got.item() - ref.item()) < 1e-5, (got.item(), ref.item())
    (g_got,) = torch.autograd.grad(got, rationale, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, rationale)
    assert (g_got - g_ref).abs().max() < 1e-6
    assert g_got[3].abs().max() == 0 and g_got[1, 4:].abs().max() == 0  # the empty example, padding
    with pytest.raises(RuntimeError):  # the label side is detached: no graph reaches it
        torch.autograd.grad(pooled_distribution_ce_sum(label, label_mask, rationale.detach(), rationale_mask), label)
    noisy = rationale.detach().clone()
    noisy[1, 4:] = 50.0  # padding positions hold garbage: nothing changes
    assert pooled_distribution_ce_sum(label, label_mask, noisy, rationale_mask).item() == pytest.approx(
        got.item(), abs=1e-6
    )
    # the authors' version (max over every position of the probabilities, fed to a CE as logits) differs
    authors = sum(F.cross_entropy(torch.softmax(rationale[b], -1).max(0).values[None],
                                  torch.softmax(label[b], -1).max(0).values[None].detach()) for b in range(3))
    assert abs(authors.item() - got.item()) > 0.1


def test_infonce_and_pooling_match_references():
    g = torch.Generator().manual_seed(1)
    anchors, candidates = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    anchors.requires_grad_()
    got = infonce_sum(anchors, candidates, 0.1)
    ref = 0.0
    for i in range(5):
        sims = torch.stack([F.cosine_similarity(anchors[i], candidates[j], dim=0) for j in range(5)]) / 0.1
        ref = ref - (sims[i] - torch.logsumexp(sims, dim=0))
    assert abs(got.item() - ref.item()) < 1e-5
    (g1,) = torch.autograd.grad(got, anchors)
    (g2,) = torch.autograd.grad(ref, anchors)
    assert (g1 - g2).abs().max() < 1e-5
    hidden = torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pooled = masked_mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], (hidden[0, 1] + hidden[0, 2]) / 2) and torch.allclose(pooled[1], hidden[1].mean(0))


def test_first_step_loss_equals_a_reference_on_the_model(sbs, tiny_tokenizer, dist1, tmp_path):
    """alpha x (label CE, mean over the step's label tokens) + (1 - alpha) x (rationale CE, mean over
    its tokens) + beta x (pooled CE, mean over questions), over 2 accumulated micro-batches, against the
    same numbers computed here from the model's full logits."""
    from engine.checkpoint import load_model
    from engine.text.tokenizer import load_tokenizer

    records = json.load(open(sbs / "arith" / "train.json"))[:6]
    path = tmp_path / "six.json"
    path.write_text(json.dumps(records))
    alpha, beta = 0.3, 0.5
    train.main(
        **_base(
            sbs,
            train_file=str(path),
            ckpt_dir=str(sbs / "m1"),
            save_dir=str(tmp_path / "run"),
            max_steps=1,
            max_batch_size=3,
            accumulation_steps=2,
            alpha=alpha,
            beta=beta,
            mi_estimator="pooled_ce",  # the former name, still accepted: the same estimator
        )
    )
    assert json.load(open(tmp_path / "run" / "run_config.json"))["mi_estimator"] == "pooled_distribution_ce"
    logged = _metrics(tmp_path / "run")[0]
    tok, model = load_tokenizer(tiny_tokenizer), load_model(str(sbs / "m1"))
    sums, counts, mi = {"label": 0.0, "rationale": 0.0}, {"label": 0, "rationale": 0}, 0.0
    with torch.no_grad():
        for rec in records:
            pooled = {}
            for task, target in (("label", rec["label"]), ("rationale", rec["output"])):
                prompt = tok.encode(PREFIX[task] + rec["instruction"], bos=True)
                response = tok.encode(target, bos=False, eos=True)
                logits = model(torch.tensor([prompt + response[:-1]]))[0, len(prompt) - 1:]
                sums[task] += float(F.cross_entropy(logits, torch.tensor(response), reduction="sum"))
                counts[task] += len(response)
                pooled[task] = _reference_pooled(logits, torch.ones(len(logits), dtype=torch.bool))
            mi += float(-(pooled["label"] * pooled["rationale"].log()).sum())
    ref = {"label": sums["label"] / counts["label"], "rationale": sums["rationale"] / counts["rationale"],
           "mi": mi / len(records)}
    for part in ref:
        assert abs(logged[f"loss_{part}"] - ref[part]) < 1e-5, (part, logged, ref)
    total = alpha * ref["label"] + (1 - alpha) * ref["rationale"] + beta * ref["mi"]
    assert abs(logged["loss"] - total) < 1e-5


# ----- tensor parallelism ------------------------------------------------------------------------
@pytest.mark.processes
def test_mi_term_tp2_equals_tp1_on_sharded_logits(tmp_path, dist1):
    """Every estimator on vocabulary shards (tests/test_mi_calibration_bleu.py compares the authors'
    at TP=2 with their code too)."""
    torchrun("tests/workers/mi_worker.py", str(tmp_path / "tp2.pt"))
    for name, two in torch.load(tmp_path / "tp2.pt").items():
        one = mi_loss_grads(estimator=name)
        assert abs(one["loss"] - two["loss"]) < 1e-5, name
        assert (one["grad_rationale"] - two["grad_rationale"]).abs().max() < 1e-6, name
        assert one["label_grad_is_none"] and two["label_grad_is_none"]


@pytest.mark.processes
@pytest.mark.parametrize("estimator", ["pooled_distribution_ce", "authors", "critic"])
def test_training_tp2_equals_tp1(sbs, estimator, dist1):
    """Losses (every part) and updated weights after 3 steps, TP=2 against TP=1."""
    base = _base(sbs, alpha=0.4, beta=0.5, mi_estimator=estimator, accumulation_steps=2)
    train.main(**base, ckpt_dir=str(sbs / "m1"), save_dir=str(sbs / f"{estimator}-tp1"))
    torchrun("train.py", *train_args({**base, "ckpt_dir": sbs / "m2", "save_dir": sbs / f"{estimator}-tp2"}))
    assert_same_run(str(sbs / f"{estimator}-tp1"), str(sbs / f"{estimator}-tp2"))
    for a, b in zip(_metrics(sbs / f"{estimator}-tp1"), _metrics(sbs / f"{estimator}-tp2")):
        assert abs(a["loss_mi"] - b["loss_mi"]) < 1e-5 and abs(a["loss_label"] - b["loss_label"]) < 1e-5


# ----- --beta 0 and --alpha 1 ----------------------------------------------------------------------
def test_beta_0_is_step_by_step_exactly(sbs, dist1, tmp_path):
    """--beta 0: no MI part, no critic, nothing of it saved; the CE parts are the ones the MI runs
    compute at the same weights, and the loss is exactly alpha x label + (1 - alpha) x rationale."""
    train.main(**_base(sbs, alpha=0.4, beta=0.0, ckpt_dir=str(sbs / "m1"), save_dir=str(tmp_path / "b0")))
    train.main(**_base(sbs, alpha=0.4, beta=0.5, mi_estimator="critic", ckpt_dir=str(sbs / "m1"), max_steps=1,
                       save_every=1, save_dir=str(tmp_path / "critic")))
    plain, with_mi = _metrics(tmp_path / "b0"), _metrics(tmp_path / "critic")
    assert all("loss_mi" not in line for line in plain)
    assert plain[0]["loss_label"] == with_mi[0]["loss_label"]
    assert plain[0]["loss_rationale"] == with_mi[0]["loss_rationale"]
    for line in plain:
        assert abs(line["loss"] - (0.4 * line["loss_label"] + 0.6 * line["loss_rationale"])) < 1e-6
    state = torch.load(tmp_path / "b0" / "checkpoint-3" / "trainer_state.00.pt", weights_only=False)
    assert "extra_modules" not in state  # no critic to save
    critic = torch.load(tmp_path / "critic" / "checkpoint-1" / "trainer_state.00.pt", weights_only=False)
    assert len(critic["extra_modules"]) == 1
    with pytest.raises(UserError, match=r"was written with --beta 0\.5, not 0\.0; resume with the flags"):
        train.main(**_base(sbs, alpha=0.4, ckpt_dir=str(sbs / "m1"), max_steps=1, save_every=1, resume=True,
                           save_dir=str(tmp_path / "critic")))  # the run signature names the flag that differs


def test_alpha_1_trains_the_label_task_only(sbs, dist1, tmp_path):
    """--alpha 1 is SFT on 'predict: x' -> label: the same losses and weights, step for step; the
    rationales are neither built nor required (one record has none)."""
    records = json.load(open(sbs / "arith" / "train.json"))
    del records[3]["output"]
    dss = tmp_path / "dss.json"
    dss.write_text(json.dumps(records))
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"instruction": PREFIX["label"] + r["instruction"], "output": r["label"]}
                               for r in records]))
    train.main(**_base(sbs, train_file=str(dss), alpha=1.0, ckpt_dir=str(sbs / "m1"), save_dir=str(tmp_path / "a1")))
    base = _base(sbs, train_file=str(sft), ckpt_dir=str(sbs / "m1"), save_dir=str(tmp_path / "sft"))
    base.pop("objective")
    train.main(**base)
    assert_same_run(str(tmp_path / "a1"), str(tmp_path / "sft"), tol=0.0)
    assert not any(k.startswith("loss_") for line in _metrics(tmp_path / "a1") for k in line)  # one part only
    # infer.py score reads the recorded prefixes: the label task of a1 == the prefixed prompts on the SFT model
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"instruction": r["instruction"], "output": r["label"]} for r in records]))
    infer.score(str(tmp_path / "a1" / "checkpoint-3"), str(plain), str(tmp_path / "a1.jsonl"))
    infer.score(str(tmp_path / "sft" / "checkpoint-3"), str(sft), str(tmp_path / "sft.jsonl"))
    scores = [[json.loads(x)["sum_logprob"] for x in open(tmp_path / f)] for f in ("a1.jsonl", "sft.jsonl")]
    assert scores[0] == scores[1]


# ----- the CLI end to end under torchrun ---------------------------------------------------------
@pytest.mark.processes
def test_cli_tp2_train_resume_evaluate_calibrate(sbs, tmp_path):
    """TP=2 with the critic: a run stopped after 4 of 6 steps and resumed continues the loss curve
    exactly (the critic head is saved and restored); evaluation decodes the label task (and the
    rationale task on request); infer.py reads the task prefixes recorded with the model."""
    base = {"objective": "step_by_step", "task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 3e-3,
            "max_steps": 6, "save_every": 2, "train_file": sbs / "arith" / "train.json", "max_batch_size": 4,
            "label_file": sbs / "arith" / "test.json", "max_new_tokens": 24, "ckpt_dir": sbs / "m2", "alpha": 0.5,
            "beta": 0.1, "mi_estimator": "critic", "eval_rationale_task": True, "label_type": "llm"}
    torchrun("train.py", *train_args({**base, "save_dir": tmp_path / "straight"}))
    torchrun("train.py", *train_args({**base, "save_dir": tmp_path / "stopped", "exit_after_steps": 4}))
    assert len(losses(tmp_path / "stopped")) == 4
    torchrun("train.py", *train_args({**base, "save_dir": tmp_path / "stopped", "resume": True}))
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "stopped")
    steps = lambda lines: [(x["loss"], x["loss_mi"]) for x in lines if not x.get("eval")]  # noqa: E731
    assert len(steps(a)) == 6 and steps(a) == steps(b)
    final = [x for x in b if x.get("eval")][-1]
    assert final["total"] == 4 and {"rationale_accuracy", "rationale_bleu"} <= set(final)
    record = json.load(open(tmp_path / "stopped" / "best" / "prompt_template.json"))
    assert record["task_prefixes"] == PREFIX

    model = tmp_path / "stopped" / "checkpoint-6"
    proc = torchrun("infer.py", "calibration", "--ckpt_dir", str(model), "--data_file",
                    str(sbs / "arith" / "test.json"), "--output_file", str(tmp_path / "cal.jsonl"), "--task", "ARITH",
                    "--max_new_tokens", "8")
    summary = json.load(open(tmp_path / "cal.jsonl.summary.json"))
    assert summary["task_prefix"] == "label" and summary["records"] == 4 and 0 <= summary["ece"] <= 1
    assert os.path.getsize(tmp_path / "cal.reliability.png") > 1000
    lines = [json.loads(x) for x in open(tmp_path / "cal.jsonl")]
    assert all(0 < x["confidence"] <= 1 for x in lines)
    assert "decoding the label task" in proc.stdout

    torchrun("infer.py", "--ckpt_dir", str(model), "--data_file", str(sbs / "arith" / "test.json"), "--output_file",
             str(tmp_path / "rat.jsonl"), "--task_prefix", "rationale", "--max_new_tokens", "24", "--task", "ARITH")
    meta = json.load(open(tmp_path / "rat.jsonl.meta.json"))
    assert meta["task_prefix"] == "rationale"
    assert json.loads(open(tmp_path / "rat.jsonl").readline())["prompt"].startswith(PREFIX["rationale"])
    proc = run_cli("infer.py", "bleu", "--predictions_file", str(tmp_path / "rat.jsonl"), "--references_file",
                   str(sbs / "arith" / "test.json"))
    assert proc.returncode == 0 and 0 <= json.loads(proc.stdout)["bleu"] <= 100
    proc = run_cli("infer.py", "--ckpt_dir", str(model), "--data_file", str(sbs / "arith" / "test.json"),
                   "--output_file", str(tmp_path / "rat.jsonl"), "--task_prefix", "label", "--max_new_tokens", "24",
                   "--task", "ARITH")
    assert proc.returncode != 0 and "--task_prefix 'rationale', not 'label'" in proc.stderr


# ----- data --------------------------------------------------------------------------------------
def test_our_parse_keeps_the_answer_sentence_and_letters(tmp_path):
    """--parse ours --label_format letter: the rationale through its answer sentence, choice labels as
    letters; the default (the authors' split, text labels) on the same records."""
    choices = ["bank", "library", "department store", "mall", "new york"]
    raw = "Banks keep money safe behind doors. So the answer is (a) bank.\n\nQ: Where do you keep a book?"
    assert parse_teacher_output(raw, "CSQA", choices) == (
        "Banks keep money safe behind doors. So the answer is (a) bank.", "A", "")
    assert parse_teacher_output("Doors guard money. So the answer is bank", "CSQA", choices)[1] == "A"
    assert parse_teacher_output("So the answer is (a) bank.", "CSQA", choices)[2] == "no_rationale"
    assert parse_teacher_output("Banks are safe.", "CSQA", choices)[2] == "no_answer_sentence"
    zoo = "It is a zoo. So the answer is (f) zoo."
    assert parse_teacher_output(zoo, "CSQA", choices)[2] == "unreadable_teacher_label"
    svamp = "He had 32 and ate 5.0. The answer is (32.0 - 5.0).\nQ: next"
    assert parse_teacher_output(svamp, "SVAMP") == ("He had 32 and ate 5.0. The answer is (32.0 - 5.0).",
                                                    "(32.0 - 5.0)", "")

    records = [
        {"id": "q1", "question": "A revolving door is a security measure at a what?", "choices": choices,
         "answer": "bank", "llm_output": raw},
        {"question": "Where are books?", "choices": choices, "answer": "library",
         "llm_output": "Books sit on shelves. So the answer is (c) department store."},
        {"question": "Where?", "choices": choices, "answer": "mall", "llm_output": "I do not know."},
        {"input": "Pick one.\nAnswer Choices:\n(a) x\n(b) y", "label": "B", "llm_rationale": "y fits best.",
         "llm_label": "(b) y"},
    ]
    src = tmp_path / "raw.json"
    src.write_text(json.dumps(records))
    prepare_main(str(tmp_path / "authors.json"), input_file=str(src), task="CSQA")
    authors = json.load(open(tmp_path / "authors.json"))
    assert [(r["output"], r["label"], r["llm_label"]) for r in authors] == [
        ("Banks keep money safe behind doors.", "bank", "bank"),
        ("Books sit on shelves.", "library", "department store"),
        ("y fits best.", "y", "y")]  # "I do not know." has no "So the answer is": the authors' parser raises
    ours = dict(parse="ours", label_format="letter")
    prepare_main(str(tmp_path / "out.json"), input_file=str(src), task="CSQA", **ours)
    out = json.load(open(tmp_path / "out.json"))
    assert len(out) == 3
    assert out[0] == {"id": "q1", "instruction": "A revolving door is a security measure at a what?\nAnswer Choices:\n"
                      "(a) bank\n(b) library\n(c) department store\n(d) mall\n(e) new york",
                      "output": "Banks keep money safe behind doors. So the answer is (a) bank.", "label": "A",
                      "llm_label": "A"}
    assert (out[1]["label"], out[1]["llm_label"]) == ("B", "C") and out[2]["llm_label"] == "B"
    with pytest.raises(UserError, match="already exists"):
        prepare_main(str(tmp_path / "out.json"), input_file=str(src), task="CSQA", **ours)
    records[0]["answer"] = "zoo"
    src.write_text(json.dumps(records))
    with pytest.raises(UserError) as e:
        prepare_main(str(tmp_path / "o2.json"), input_file=str(src), task="CSQA", **ours)
    assert str(e.value) == (f"{src} record 0: the gold label 'zoo' cannot be read as a CSQA answer (nor matched to "
                            f"one of its choices)")


def test_authors_layout_and_svamp_equations(tmp_path):
    """The authors' svamp directory: source records as JSON lines plus llm/train_CoT_N.json; gold and
    teacher labels are equations, read by their value, so a label task that answers "( 32 - 5 )" is
    right about 27."""
    d = tmp_path / "svamp"
    (d / "llm").mkdir(parents=True)
    rows = [{"input": "Tom had 32 apples\nHe ate 5. How many are left?", "label": "( 32.0 - 5.0 )"},
            {"input": "Ann has 3 bags of 4\nHow many?", "label": "( 3.0 * 4.0 )"},
            {"input": "x\ny", "label": "( 1.0 + 1.0 )"}]
    (d / "svamp_train.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "llm" / "train_CoT_0.json").write_text(json.dumps([
        "Tom had 32 apples and ate 5, so 32 - 5 = 27. The answer is (32 - 5).\n\nQ: more",
        "3 bags of 4 is 3 * 4 = 13. The answer is (3 * 4 + 1)."]))
    (d / "llm" / "train_CoT_1.json").write_text(json.dumps(["no idea"]))
    prepare_main(str(tmp_path / "out.json"), dataset_dir=str(d))
    out = json.load(open(tmp_path / "out.json"))
    assert [(r["label"], r["llm_label"]) for r in out] == [("( 32.0 - 5.0 )", "(32 - 5)"),
                                                           ("( 3.0 * 4.0 )", "(3 * 4 + 1)")]
    assert out[0]["instruction"] == rows[0]["input"]
    assert parse_label("( 32.0 - 5.0 )", "SVAMP") == "27" and parse_label("( 32.0 - 5.0 )", "GSM8K") is None
    assert is_correct(extract_answer("( 32 - 5 )", "SVAMP"), "( 32.0 - 5.0 )", "SVAMP")
    assert is_correct(extract_answer("... The answer is (30 - 3).", "SVAMP"), "27", "SVAMP")
    assert not is_correct(extract_answer("(3 * 4 + 1)", "SVAMP"), "( 3.0 * 4.0 )", "SVAMP")
    assert extract_answer("__import__('os') 5", "SVAMP") == "5"  # never evaluated, only read
    (d / "llm" / "train_CoT_1.json").unlink()
    with pytest.raises(UserError, match="holds 2 teacher outputs for train, but .* has 3 records"):
        prepare_main(str(tmp_path / "o2.json"), dataset_dir=str(d))


def test_instruction_records_as_infer_writes_them(tmp_path, capsys, tiny_tokenizer):
    """infer.py's output (instruction, output: one text or --num_samples K of them, label) and MCC-KD
    files are read like every other tool reads them; a list keeps its usable rationales and the label
    most of them state; the file written trains the step-by-step tasks (both label types)."""
    from engine.distill.step_by_step.data import LabelSource, StepByStepData
    from engine.text.tokenizer import load_tokenizer

    ask = "Pick one.\nAnswer Choices:\n(a) x\n(b) y"

    def line(i, output, label="B"):  # the keys infer.py writes
        return {"id": i, "index": i, "instruction": ask, "prompt": f"### Instruction:\n{ask}\n\n### Response:\n",
                "output": output, "finish": "stop", "label": label, "prediction": None, "correct": False}

    rows = [line(0, "y is the one. So the answer is (b) y.\n\nQ: next"),
            line(1, ["x fits. So the answer is (a) x.", "y fits. So the answer is (b) y.", "I cannot say.",
                     "y again. The answer is (b)."]),
            line(2, ["no idea", "none either"]), line(3, ["x it is. So the answer is (a) x."], label="A")]
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_main(str(tmp_path / "out.json"), input_file=str(src), task="CSQA", parse="ours", label_format="letter")
    out = json.load(open(tmp_path / "out.json"))
    assert out == [
        {"id": 0, "instruction": ask, "output": "y is the one. So the answer is (b) y.", "label": "B", "llm_label": "B"},
        {"id": 1, "instruction": ask, "output": ["x fits. So the answer is (a) x.", "y fits. So the answer is (b) y.",
                                                 "y again. The answer is (b)."], "label": "B", "llm_label": "B"},
        {"id": 3, "instruction": ask, "output": "x it is. So the answer is (a) x.", "label": "A", "llm_label": "A"}]
    printed = capsys.readouterr().out
    assert printed.startswith("kept 3 of 4 records") and "no_answer_sentence: 1\n" in printed
    assert json.loads(printed.strip().splitlines()[-1])["dropped"] == {"no_answer_sentence": 1,
                                                                       "rationales_no_answer_sentence": 3}
    tok = load_tokenizer(tiny_tokenizer)
    for label_type in ("gt", "llm"):
        assert len(StepByStepData(out, tok, 256, labels=LabelSource("CSQA", label_type))) == 3
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")  # the default: the authors' split, text labels
    prepare_main(str(tmp_path / "one.json"), input_file=str(tmp_path / "one.jsonl"), task="CSQA")
    assert json.load(open(tmp_path / "one.json")) == [
        {"id": 0, "instruction": ask, "output": "y is the one.", "label": "y", "llm_label": "y"}]
    mcc = [{"instruction": "Natalia sold 48 clips in April and half as many in May. How many in all?",
            "output": ["48 / 2 = 24. 48 + 24 = 72.\nTherefore, the answer is 72 .", "She sold 72.\nThe answer is 70 ."],
            "label": "72"}]  # an MCC-KD file (train_mcc.py's): a tie goes to the answer stated first
    (tmp_path / "mcc.json").write_text(json.dumps(mcc))
    prepare_main(str(tmp_path / "mcc-sbs.json"), input_file=str(tmp_path / "mcc.json"), task="GSM8K")
    assert [(r["instruction"], r["llm_label"], len(r["output"])) for r in json.load(open(tmp_path / "mcc-sbs.json"))] \
        == [(mcc[0]["instruction"], "72", 2)]
    (tmp_path / "bare.json").write_text(json.dumps([{"instruction": ask, "label": "B"}]))
    with pytest.raises(UserError, match=r"bare.json record 0 has no teacher output \('llm_output' raw text, "):
        prepare_main(str(tmp_path / "o3.json"), input_file=str(tmp_path / "bare.json"), task="CSQA")


# ----- ECE and BLEU against hand computations -----------------------------------------------------
def test_ece_by_hand():
    # bins of width 0.1: 0.05 -> bin 0; 0.62, 0.68 -> bin 6; 0.95, 1.0 -> bin 9
    conf = [0.05, 0.62, 0.68, 0.95, 1.0]
    correct = [False, True, False, True, True]
    # bin 0: |0 - 0.05| x 1/5; bin 6: |0.5 - 0.65| x 2/5; bin 9: |1 - 0.975| x 2/5
    expected = 0.05 / 5 + 0.15 * 2 / 5 + 0.025 * 2 / 5
    got = calibration_bins(conf, correct, 10)
    assert got["ece"] == pytest.approx(expected, abs=1e-12)
    assert [b["count"] for b in got["bins"]] == [1, 0, 0, 0, 0, 0, 2, 0, 0, 2]
    assert got["bins"][6]["accuracy"] == 0.5 and got["bins"][6]["confidence"] == pytest.approx(0.65)


def test_bleu_by_hand_and_against_sacrebleu():
    # one sentence, hand-counted: hyp "the cat sat on the mat" vs ref "the cat is on the mat"
    # 1-grams 5/6 (sat unmatched), 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat),
    # 4-grams 0/3 -> smoothed 100 / (2 x 3); equal lengths, no brevity penalty
    got = corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    p = [5 / 6, 3 / 5, 1 / 4, 1 / 6]
    assert got["bleu"] == pytest.approx(100 * math.exp(sum(math.log(x) for x in p) / 4), abs=1e-9)
    assert got["brevity_penalty"] == 1.0
    # a shorter hypothesis: BP = exp(1 - 6/4); the closest of two references is the 6-token one
    short = corpus_bleu(["the cat on mat"], [["the cat is on the mat", "a cat is sitting on the red mat"]])
    assert short["ref_len"] == 6 and short["brevity_penalty"] == pytest.approx(math.exp(1 - 6 / 4))
    assert tokenize_13a("So 7-2=5, the answer is (a) bank.") == \
        ["So", "7", "-", "2", "=", "5", ",", "the", "answer", "is", "(", "a", ")", "bank", "."]
    # numbers sacrebleu 2.5.1 printed for the same corpus: corpus_bleu(hyps, [refs]).score
    hyps = ["So 47 + 38 = 85 . So the answer is 85 .", "the cat is on the mat"]
    refs = [["So 7 + 8 = 15 , carry 1 . So the answer is 85 ."], ["there is a cat on the mat"]]
    assert corpus_bleu(hyps, refs)["bleu"] == pytest.approx(37.463506270939654, abs=1e-9)


# ----- bad input ---------------------------------------------------------------------------------
@pytest.mark.processes
def test_bad_input_is_one_sentence(sbs, dist1, tmp_path):
    base = _base(sbs, ckpt_dir=str(sbs / "m1"), save_dir=str(tmp_path / "s"), max_steps=1)

    def err(**kw):
        with pytest.raises(UserError) as e:
            train.main(**{**base, **kw})
        assert "\n" not in str(e.value)
        return str(e.value)

    assert err(alpha=1.5) == "--alpha must be in [0, 1] (the label task's weight), got 1.5"
    assert err(beta=-0.1) == "--beta must be >= 0 (0: no mutual-information term), got -0.1"
    assert err(objective="dss") == "--objective 'dss' is not one of sft, step_by_step, teacher_kl, on_policy"
    assert err(beta=0.1, mi_estimator="mine") == (
        "--mi_estimator 'mine' is not one of pooled_distribution_ce, authors, critic (pooled_ce: the former "
        "name of pooled_distribution_ce)"
    )
    assert "has no effect with --beta 0" in err(mi_estimator="critic")
    assert err(label_type="teacher") == "--label_type 'teacher' is not one of gt, llm"
    assert "has no effect with --alpha 0 and --beta 0" in err(alpha=0.0, label_type="llm")
    records = json.load(open(sbs / "arith" / "train.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([records[0], {"instruction": "What is 1 + 2 ?", "label": "3"}]))
    assert err(train_file=str(bad)) == f"{bad} record 1 has no rationale ('output') for the rationale task"
    bad.write_text(json.dumps([records[0], {**records[1], "label": "many"}]))
    assert err(train_file=str(bad)) == \
        f"{bad} record 1: 'label' 'many' is not an answer of --task ARITH (--label_type gt)"
    bad.write_text(json.dumps([records[0], {**records[1], "llm_label": None, "output": "I cannot say."}]))
    assert err(train_file=str(bad), label_type="llm") == (
        f"{bad} record 1: the answer its rationale states (None) is not an answer of --task ARITH (--label_type llm)")
    assert err(objective="sft", alpha=0.5) == "--alpha belongs to --objective step_by_step, not sft"
    assert err(eval_rationale_task=True) == "--eval_rationale_task True needs --label_file (the records evaluated)"
    assert err(beta=0.1, mi_estimator="critic", max_batch_size=1) == (
        "--mi_estimator critic needs 2 or more questions per micro-batch on each of the 1 data-parallel replicas "
        "(its negatives); --max_batch_size is 1")
    proc = run_cli("train.py", "--objective", "step_by_step", "--alpha", "2", "--task", "ARITH", "--ckpt_dir", "x",
                   "--save_dir", str(tmp_path / "c"), "--train_file", str(sbs / "arith" / "train.json"))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == \
        "error: --alpha must be in [0, 1] (the label task's weight), got 2.0"
    proc = run_cli("infer.py", "--ckpt_dir", str(sbs / "m1"), "--data_file", str(sbs / "arith" / "test.json"),
                   "--output_file", str(tmp_path / "o.jsonl"), "--task_prefix", "answer")
    assert proc.returncode != 0 and "--task_prefix 'answer' is unknown; choose one of label, rationale" in proc.stderr
