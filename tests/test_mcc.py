"""MCC-KD: the objective against a direct reference, TP=2 == TP=1, answer spans and the rationale
pipeline on real data, the end-to-end path teacher -> samples -> training file -> train_mcc."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import checkpoint_split as cks
import infer
import train
import train_mcc
from data.arithmetic import main as make_arith
from data.prepare_mcc import main as prepare_main, most_diverse
from engine.distill.mcc.data import MultiRationaleData
from engine.distill.mcc.losses import mcc_kd_sums, span_prediction_positions
from engine.runtime.errors import UserError
from engine.text.answers import find_answer_span
from engine.text.sequences import IGNORE
from engine.text.tokenizer import load_tokenizer
from tests.conftest import shared_path
from tests.helpers import assert_same_run, torchrun, train_args


def test_loss_matches_a_direct_reference(dist1):
    """Hand-made logits: CE over labelled tokens, and the symmetric KL between the predictions OF
    the span tokens (one position earlier), masked where spans are shorter, averaged over pairs."""
    g = torch.Generator().manual_seed(0)
    B, T, V, temp = 3, 10, 11, 1.3
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = IGNORE
    labels[2, 8:] = IGNORE  # padding
    spans = [(5, 7), (6, 8), (4, 5)]  # [start, end) of answer tokens in rows 0, 1, 2
    pos = [span_prediction_positions(*s) for s in spans]
    assert pos[0] == [4, 5] and pos[2] == [3]
    pairs = [(0, pos[0], 1, pos[1]), (0, pos[0][:1], 2, pos[2])]  # two pairs, span lengths 2 and 1
    ce, kl = mcc_kd_sums(logits.clone(), labels, pairs, temp)

    ref_ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")

    def sym_kl(ra, pa, rb, pb):
        total = 0.0
        for a, b in zip(pa, pb):
            p = F.log_softmax(logits[ra, a] / temp, -1)
            q = F.log_softmax(logits[rb, b] / temp, -1)
            total = total + 0.5 * ((p.exp() * (p - q)).sum() + (q.exp() * (q - p)).sum())
        return total / len(pa)

    ref_kl = sym_kl(*pairs[0]) + sym_kl(*pairs[1])
    assert torch.allclose(ce, ref_ce, atol=1e-5) and torch.allclose(kl, ref_kl, atol=1e-6)
    at_positions = [(0, [5, 6], 1, [6, 7]), (0, [5], 2, [4])]  # the seed's off-by-one
    assert not torch.allclose(mcc_kd_sums(logits.clone(), labels, at_positions, temp)[1], ref_kl)
    (g1,) = torch.autograd.grad(ce + 0.5 * kl, logits)
    (g2,) = torch.autograd.grad(ref_ce + 0.5 * ref_kl, logits)
    assert torch.allclose(g1, g2, atol=1e-6)  # both branches of every pair get gradient
    assert g1[1, 6].abs().sum() > 0 and g1[2, 3].abs().sum() > 0


# ----- the authors' loss (tests/mcc_authors.py: DEC23 src/trainer.py:163-197, src/utils.py:137-187) -----
def check_against_the_authors(results: dict) -> None:
    """Every setting of --span_logits / --ce_reduction equals its reference from the full logits
    (value and every gradient), `authors/sequence` equals the authors' DEC23 loss, and the inputs
    are ones where the settings differ."""
    for key, r in results.items():
        for part in ("ce", "kl", "loss"):
            assert r["ours"][part] == pytest.approx(r["reference"][part], rel=2e-5, abs=1e-7), (key, part, r)
        assert r["grad_diff"] <= 1e-5 * r["grad_scale"], (key, r["grad_diff"], r["grad_scale"])
    theirs = results["authors/sequence"]
    for part in ("ce", "kl", "loss"):
        assert theirs["ours"][part] == pytest.approx(theirs["dec23"][part], rel=2e-5, abs=1e-7), part
    ours = results["ours/token"]["ours"]
    assert abs(ours["kl"] - results["authors/token"]["ours"]["kl"]) > 0.02 * ours["kl"]  # the span shift matters
    assert abs(ours["ce"] - results["ours/sequence"]["ours"]["ce"]) > 0.05  # so does the CE's reduction
    assert abs(results["ours/token"]["ours"]["loss"] - results["ours/token"]["dec23"]["loss"]) > 0.05


@pytest.fixture(scope="module")
def mcc_models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("mcc_models")
    cks.init("tiny-llama", str(root / "m1"), n=1, tokenizer=tiny_tokenizer, seed=1)
    cks.split(str(root / "m1"), str(root / "m2"), n=2)
    return root


def test_loss_settings_match_the_authors_tp1(mcc_models, dist1):
    from tests.workers.mcc_worker import mcc_task_losses

    check_against_the_authors(mcc_task_losses(str(mcc_models / "m1")))


@pytest.mark.processes
def test_loss_settings_match_the_authors_tp2(mcc_models, tmp_path, dist1):
    from tests.workers.mcc_worker import mcc_task_losses

    torchrun("tests/workers/mcc_worker.py", str(mcc_models / "m2"), str(tmp_path / "tp2.pt"))
    tp2 = torch.load(tmp_path / "tp2.pt")
    check_against_the_authors(tp2)
    tp1 = mcc_task_losses(str(mcc_models / "m1"))
    for key in tp1:
        for part in ("ce", "kl", "loss"):
            assert tp2[key]["ours"][part] == pytest.approx(tp1[key]["ours"][part], rel=1e-5), (key, part)


def test_train_mcc_flags_reach_the_loss(mcc_models, tmp_path, dist1):
    """train_mcc.py --span_logits authors --ce_reduction sequence: the first step's logged loss
    parts (at the initial weights, every question in the batch) are the authors' DEC23 loss."""
    from tests.workers.mcc_worker import ALPHA, TEMPERATURE, mcc_task_losses, records_file

    expected = mcc_task_losses(str(mcc_models / "m1"), head_scale=1.0)
    for span_logits, ce_reduction in (("authors", "sequence"), ("ours", "token")):
        save = tmp_path / f"{span_logits}-{ce_reduction}"
        train_mcc.main(
            task="ARITH",
            ckpt_dir=str(mcc_models / "m1"),
            save_dir=str(save),
            train_file=records_file(str(tmp_path / "t.json")),
            template="none",
            max_steps=1,
            max_batch_size=3,
            alpha=ALPHA,
            temperature=TEMPERATURE,
            span_logits=span_logits,
            ce_reduction=ce_reduction,
        )
        line = json.loads(open(save / "metrics.jsonl").readline())
        want = expected[f"{span_logits}/{ce_reduction}"]
        want = want["dec23"] if span_logits == "authors" else want["reference"]
        assert line["loss_ce"] == pytest.approx(want["ce"], rel=1e-5)
        assert line["loss_kl"] == pytest.approx(want["kl"], rel=1e-4)


@pytest.fixture(scope="module")
def sum3(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("mcc")
    make_arith(str(root / "data"), kind="sum3", n_train=40, n_test=8, max_value=9, seed=3)
    return root


@pytest.mark.processes
def test_mcc_tp2_equals_tp1(sum3, tiny_tokenizer, dist1):
    root = sum3
    cks.init("tiny-qwen2", str(root / "m1"), n=1, tokenizer=tiny_tokenizer, seed=1)
    cks.split(str(root / "m1"), str(root / "m2"), n=2)
    base = {"task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 2e-3, "max_steps": 3, "save_every": 3,
            "train_file": str(root / "data" / "train.json"), "max_batch_size": 4, "alpha": 1.0, "temperature": 1.3,
            "num_rationales": 3}
    train_mcc.main(ckpt_dir=str(root / "m1"), save_dir=str(root / "tp1"), **base)
    torchrun("train_mcc.py", *train_args({**base, "ckpt_dir": root / "m2", "save_dir": root / "tp2"}))
    assert_same_run(str(root / "tp1"), str(root / "tp2"))
    lines = [json.loads(line) for line in open(root / "tp2" / "metrics.jsonl")]
    assert all(line["loss_kl"] > 0 for line in lines)
    assert all(abs(line["loss"] - line["loss_ce"] - line["loss_kl"]) < 1e-6 for line in lines)  # alpha = 1
    assert os.path.exists(root / "tp2" / "curves.png")


def test_svamp_pipeline_with_the_llama2_tokenizer(tmp_path):
    raw = shared_path("data", "mcc", "SVAMP", "train.json")
    tok_path = shared_path("data", "tokenizers", "llama2.model")
    prepare_main(raw, str(tmp_path / "svamp.json"), tok_path, num_rationales=3, task="SVAMP")
    out = json.load(open(tmp_path / "svamp.json"))
    assert len(out) >= 600  # of 700 questions: most keep at least 2 rationales
    assert all(2 <= len(r["output"]) <= 3 and len(r["indices"]) == len(r["output"]) for r in out)
    # spans: found for >= 95% of the correct rationales (automatic), and the written indices validate
    tok = load_tokenizer(tok_path)
    data = MultiRationaleData(out, tok, 2048, num_rationales=3)
    assert data.stats["no_span"] == 0 and len(data) == len(out)
    found = total = 0
    from engine.text.answers import extract_answer, is_correct

    for rec in json.load(open(raw))[:150]:
        for text in rec["output"]:
            if is_correct(extract_answer(text, "SVAMP"), rec["label"], "SVAMP"):
                total += 1
                found += find_answer_span(tok, tok.encode(text, bos=False), text, rec["label"]) is not None
    assert found / total >= 0.95, (found, total)


def test_indices_are_validated(sum3, tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    text = "2 + 3 = 5 . 5 + 4 = 9 . Therefore, the answer is 9 ."
    ids = tok.encode(text, bos=False, eos=True)
    s, e = find_answer_span(tok, ids, text, "9")
    rec = {"instruction": "What is 2 + 3 + 4 ?", "output": [text, text.replace("2 + 3 = 5 . 5", "3 + 4 = 7 . 7")],
           "label": "9"}
    other = find_answer_span(tok, tok.encode(rec["output"][1], bos=False, eos=True), rec["output"][1], "9")
    ok = MultiRationaleData([{**rec, "indices": [[s, e], [list(other)]]}], tok, 128, template="none")
    assert ok.spans[0] == [(s, e), other]
    prompt_len = len(tok.encode("What is 2 + 3 + 4 ?"))
    full = MultiRationaleData([{**rec, "indices": [[s + prompt_len, e + prompt_len], list(other)]}], tok, 128,
                              template="none")  # positions counted over the whole sequence, as the seed's files
    assert full.spans[0][0] == (s, e)
    with pytest.raises(UserError, match=r"train_file record 0: indices \[1, 2\] of rationale 0 do not spell"):
        MultiRationaleData([{**rec, "indices": [[1, 2], list(other)]}], tok, 128, template="none")
    with pytest.raises(UserError, match="out of range"):
        MultiRationaleData([{**rec, "indices": [[500, 502], list(other)]}], tok, 128, template="none")
    with pytest.raises(UserError, match="record 0 lacks the key 'label'"):
        MultiRationaleData([{"instruction": "q", "output": [text, text]}], tok, 128)
    # a question with one usable rationale is dropped and counted, not fatal
    data = MultiRationaleData([rec, {**rec, "output": [text, "no answer here"]}], tok, 128, template="none")
    assert len(data) == 1 and data.stats["dropped_questions"] == 1 and data.stats["no_span"] == 1


def test_flag_errors(sum3, tiny_tokenizer, tmp_path, dist1):
    base = dict(task="ARITH", ckpt_dir="unused", save_dir=str(tmp_path / "x"),
                train_file=str(sum3 / "data" / "train.json"))
    with pytest.raises(UserError, match="--alpha must be >= 0"):
        train_mcc.main(alpha=-0.1, **base)
    with pytest.raises(UserError, match="--temperature must be > 0"):
        train_mcc.main(temperature=0, **base)
    with pytest.raises(UserError, match="--span_logits must be ours or authors, got 'late'"):
        train_mcc.main(span_logits="late", **base)
    with pytest.raises(UserError, match="--ce_reduction must be token or sequence, got 'mean'"):
        train_mcc.main(ce_reduction="mean", **base)


def test_most_diverse_prefers_different_rationales():
    texts = ["a b c d e f", "a b c d e g", "x y z w v u", "a b c x y z"]
    assert most_diverse(texts, 2) == [0, 2] or most_diverse(texts, 2) == [1, 2]
    assert len(most_diverse(texts, 3)) == 3 and 2 in most_diverse(texts, 3)


@pytest.mark.processes
def test_end_to_end_teacher_samples_to_mcc_training(tmp_path, tiny_tokenizer, dist1):
    """A teacher trained here samples 4 rationales per question; prepare_mcc keeps the correct,
    diverse ones with spans; train_mcc trains a student on them at TP=2."""
    make_arith(str(tmp_path / "data"), kind="sum3", n_train=600, n_test=50, max_value=9, seed=0)
    cks.init("tiny-llama", str(tmp_path / "init"), tokenizer=tiny_tokenizer, seed=0)
    train.main(task="ARITH", ckpt_dir=str(tmp_path / "init"), save_dir=str(tmp_path / "teacher"),
               train_file=str(tmp_path / "data" / "train.json"), max_batch_size=32, max_steps=400, lr=5e-3,
               warmup_steps=30, template="none", max_seq_len=64)
    infer.generate(ckpt_dir=str(tmp_path / "teacher" / "checkpoint-400"), data_file=str(tmp_path / "data" / "train.json"),
                   output_file=str(tmp_path / "raw.jsonl"), num_samples=4, temperature=0.8, template="none",
                   max_new_tokens=32, batch_size=64, task="ARITH", progress=False)
    raw = [json.loads(line) for line in open(tmp_path / "raw.jsonl")]
    assert len(raw) == 600 and all(len(r["output"]) == 4 for r in raw)
    prepare_main(str(tmp_path / "raw.jsonl"), str(tmp_path / "mcc.json"), tiny_tokenizer, num_rationales=3,
                 task="ARITH")
    prepared = json.load(open(tmp_path / "mcc.json"))
    assert len(prepared) >= 10
    assert all(len(set(r["output"])) == len(r["output"]) >= 2 for r in prepared)
    cks.split(str(tmp_path / "init"), str(tmp_path / "student"), n=2)
    torchrun("train_mcc.py", "--task", "ARITH", "--ckpt_dir", str(tmp_path / "student"), "--save_dir",
             str(tmp_path / "run"), "--train_file", str(tmp_path / "mcc.json"), "--label_file",
             str(tmp_path / "data" / "test.json"), "--max_batch_size", "8", "--max_steps", "6", "--lr", "3e-3",
             "--template", "none", "--max_seq_len", "64", "--max_new_tokens", "32", "--alpha", "0.1",
             "--num_rationales", "3")
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [line for line in lines if not line.get("eval")]
    assert len(steps) == 6 and steps[-1]["loss_ce"] < steps[0]["loss_ce"]
    assert any(line.get("eval") and line["total"] == 50 for line in lines)


# ----- the MCC-KD authors' data ------------------------------------------------------------------
def test_authors_indices_are_read_under_the_default_template(tiny_tokenizer):
    """The authors count indices over BOS + the raw instruction + the rationale, tokenized apart; our
    default template makes the prompt longer, and their files must still train as they are."""
    tok = load_tokenizer(tiny_tokenizer)
    instruction = "What is 2 + 3 + 4 ?"
    outs = ["2 + 3 = 5 . 5 + 4 = 9 . Therefore, the answer is 9 .", "3 + 4 = 7 . 7 + 2 = 9 . Therefore, the answer is 9 ."]
    spans = [find_answer_span(tok, tok.encode(o, bos=False, eos=True), o, "9") for o in outs]
    offset = len(tok.encode(instruction, bos=True))
    rec = {"instruction": instruction, "output": outs, "label": "9",
           "indices": [[[s + offset, e + offset]] for s, e in spans]}
    data = MultiRationaleData([rec], tok, 128, template="default", task="ARITH")
    assert data.spans[0] == spans and len(data) == 1


def test_rationales_with_a_wrong_answer_are_dropped_and_counted(tiny_tokenizer, dist1, tmp_path, capsys):
    tok = load_tokenizer(tiny_tokenizer)
    right = ["2 + 7 = 9 . Therefore, the answer is 9 .", "7 + 2 = 9 . Therefore, the answer is 9 ."]
    wrong = "2 + 7 = 9 . 9 + 3 = 12 . Therefore, the answer is 12 ."  # its only "9" is a step
    rec = {"instruction": "What is 2 + 7 ?", "output": right + [wrong], "label": "9"}
    assert find_answer_span(tok, tok.encode(wrong, bos=False, eos=True), wrong, "9") is not None
    data = MultiRationaleData([rec], tok, 128, template="none", num_rationales=3, task="ARITH")
    assert data.groups[0] == [0, 1] and data.stats["wrong_answer"] == 1
    assert "1 reach another answer than the label (dropped; --keep_wrong_rationales True keeps them)" in data.describe()
    kept = MultiRationaleData([rec], tok, 128, template="none", num_rationales=3, task="ARITH", keep_wrong=True)
    assert kept.groups[0] == [0, 1, 2] and kept.stats["wrong_answer"] == 0
    (tmp_path / "t.json").write_text(json.dumps([rec] * 4))
    cks.init("tiny-llama", str(tmp_path / "m"), tokenizer=tiny_tokenizer, seed=1)
    train_mcc.main(task="ARITH", ckpt_dir=str(tmp_path / "m"), save_dir=str(tmp_path / "run"),
                   train_file=str(tmp_path / "t.json"), template="none", max_steps=1, max_batch_size=2)
    assert "4 reach another answer than the label" in capsys.readouterr().out


def test_spans_are_paired_by_their_tokens_not_their_length(tiny_tokenizer):
    """`▁C` (after a space) and `C` (after a parenthesis) have the same length and different ids."""
    tok = load_tokenizer(tiny_tokenizer)
    outs = ["It is a place. Therefore, the answer is C .", "A place it is. Therefore, the answer is C .",
            "Therefore, the answer is (C) ."]
    ids = [tok.encode(o, bos=False, eos=True) for o in outs]
    spans = [find_answer_span(tok, i, o, "C") for i, o in zip(ids, outs)]
    assert ids[0][slice(*spans[0])] != ids[2][slice(*spans[2])] and len(set(e - s for s, e in spans)) == 1
    data = MultiRationaleData([{"instruction": "Where?", "output": outs, "label": "C"}], tok, 128, template="none",
                              num_rationales=3, task="CSQA")
    assert data.groups[0] == [0, 1] and data.stats["other_span_tokens"] == 1
    pair = MultiRationaleData([{"instruction": "Where?", "output": outs[1:], "label": "C"},
                               {"instruction": "Where?", "output": outs[:2], "label": "C"}], tok, 128,
                              template="none", task="CSQA")
    assert pair.keep == [1] and pair.stats["dropped_questions"] == 1


def test_answers_written_in_words(tmp_path, tiny_tokenizer, capsys):
    from engine.text.answers import extract_answer

    assert extract_answer("She has two more. So the answer is twelve.", "SVAMP") == "12"
    assert extract_answer("Therefore, the answer is twenty-one apples", "SVAMP") == "21"
    assert extract_answer("the answer is one hundred and five .", "GSM8K") == "105"
    assert extract_answer("No one knows; 5 + 7 = 12 .", "SVAMP") == "12"  # digits win over "one"
    raw = [{"instruction": "What is 5 + 7 ?", "label": "12",
            "output": ["5 + 7 = 12 . Therefore, the answer is 12 .", "7 + 5 makes twelve. Therefore, the answer is twelve .",
                       "5 + 5 = 10 . 10 + 2 = 12 . Therefore, the answer is 12 ."]}]
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    prepare_main(str(tmp_path / "raw.json"), str(tmp_path / "out.json"), tiny_tokenizer, num_rationales=3, task="SVAMP")
    tok = load_tokenizer(tiny_tokenizer)
    word = "7 + 5 makes twelve. Therefore, the answer is twelve ."
    s, e = find_answer_span(tok, tok.encode(word, bos=False, eos=True), word, "12")
    assert tok.decode(tok.encode(word, bos=False, eos=True)[s:e]).strip() == "twelve"
    out = json.load(open(tmp_path / "out.json"))[0]
    assert len(out["output"]) == 2 and word not in out["output"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dropped = {k: v for k, v in summary["rationales_dropped"].items() if v}
    assert dropped == {"answer spelt with other tokens": 1}  # read as correct (not "wrong answer")
