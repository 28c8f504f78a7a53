"""Scoring modes and accuracy reports against the authors' code: --scoring exact is distilling
step-by-step's metric (google-research/distilling-step-by-step @ ef944263, metrics.py, run.py),
--report authors adds the MCC-KD authors' answered-only accuracy (homzer/MCC-KD HEAD
src/evaluator.py:189-197); each offered in infer.py evaluate, infer.py generation with --task and
the training evaluation, on cases where they and ours differ."""

import json

import numpy as np
import pytest

import checkpoint_split as cks
import infer
import train
import train_mcc
from engine.infer.metrics import Accuracy, accuracy_of
from engine.runtime.errors import UserError
from engine.text.answers import extract_answer, is_correct, parse_label, python_arithmetic
from engine.text.prompts import task_instruction
from tests.mcc_authors import dec23_hit, head_accuracy


# ----- distilling step-by-step's metrics, written out from their code ---------------------------
def dss_text_accuracy(decoded_preds, decoded_labels) -> float:
    """metrics.py:39-51 compute_metrics_text: exact string equality of the decoded prediction and
    the decoded label (:47), no normalisation."""
    return float(np.mean(np.array(decoded_preds) == np.array(decoded_labels)))


def dss_eval_equation(equation):
    """metrics.py:30-36 eval_equation: Python's eval(), nan on any exception."""
    try:
        answer = eval(equation)  # noqa: S307 -- the authors' computation, on the test's own strings
    except:  # noqa: E722
        answer = np.nan
    return answer


def dss_equation_accuracy(decoded_preds, decoded_labels) -> float:
    """metrics.py:70-90 compute_metrics_equation: eval() both, exact == of the values (:86); run.py
    :194-197 uses it for svamp and asdiv, compute_metrics_text for the other data sets."""
    preds = [dss_eval_equation(p) for p in decoded_preds]
    labels = [dss_eval_equation(x) for x in decoded_labels]
    return float(np.mean(np.array(preds) == np.array(labels)))


def dss_correct(prediction: str, label: str, task: str) -> bool:
    metric = dss_equation_accuracy if task in ("SVAMP", "ASDIV") else dss_text_accuracy
    return metric([prediction], [label]) == 1.0


# (output, label, task, ours): outputs as a decoder's text, labels as the data files hold them
CASES = [
    ("The answer is 18.", "18", "GSM8K", True),  # ours reads the answer sentence; exact compares strings
    ("18.0", "18", "GSM8K", True),
    ("1,000", "1000", "GSM8K", True),
    ("18", "18", "GSM8K", True),
    ("57505", "57500", "GSM8K", False),
    ("(A) bank", "A", "CSQA", True),
    ("math problem", "math problem", "CSQA", False),  # the authors' CSQA labels are choice texts
    ("0.1 + 0.2", "0.3", "SVAMP", True),  # exact rationals vs eval()'s floats
    ("( 70.0 - 27.0 )", "43", "SVAMP", True),
    ("2 ** 3", "8", "SVAMP", False),  # eval() knows powers; our equation reader + - * / only
    ("The answer is 43", "( 70.0 - 27.0 )", "SVAMP", True),  # eval() of a sentence raises
    ("7 / 2", "3.5", "ASDIV", False),  # run.py:194-197 scores ASDiv by eval() too
    ("1/0", "1", "SVAMP", False),
    ("( 3 + 4 ).", "7", "SVAMP", True),  # a final period is a syntax error to eval()
]


@pytest.mark.parametrize("output, label, task, ours", CASES)
def test_exact_scoring_is_the_step_by_step_metric(output, label, task, ours):
    exact = is_correct(extract_answer(output, task, "exact"), label, task, "exact")
    assert exact == dss_correct(output, label, task)
    assert is_correct(extract_answer(output, task), label, task) == ours  # the default is unchanged


def test_the_cases_are_ones_where_the_modes_differ():
    differ = sum(dss_correct(o, lbl, t) != ours for o, lbl, t, ours in CASES)
    assert differ >= 9


@pytest.mark.parametrize(
    "text", ["( 70.0 - 27.0 )", "0.1+0.2", "7 / 2", "7 // 2", "-7 % 3", "2 ** -1", " \t1 + 2", "\n1+2", "3"]
)
def test_python_arithmetic_gives_what_eval_gives(text):
    assert python_arithmetic(text) == eval(text)  # noqa: S307 -- the test's own strings
    assert type(python_arithmetic(text)) is type(eval(text))  # noqa: S307


@pytest.mark.parametrize("text", ["x + 1", "1/0", "\n 1 + 2", "( 3 + 4 ).", "", "__import__('os')", "2 ** 99"])
def test_python_arithmetic_refuses_without_running_anything(text):
    assert python_arithmetic(text) is None


def test_exact_reads_whitespace_at_the_ends_only():
    """T5's decoding, which the authors compare, leaves no whitespace at the ends; ours may."""
    assert is_correct(extract_answer(" math problem\n", "CSQA", "exact"), "math problem ", "CSQA", "exact")
    assert not is_correct(extract_answer("math  problem", "CSQA", "exact"), "math problem", "CSQA", "exact")
    assert extract_answer("  ", "GSM8K", "exact") is None and parse_label("", "GSM8K", "exact") is None
    assert parse_label("The answer is 3", "SVAMP", "exact") is None  # not arithmetic: unreadable as a label
    with pytest.raises(UserError, match="--scoring must be ours, exact or mcc, got 'strict'"):
        extract_answer("1", "GSM8K", "strict")


# ----- the MCC-KD authors' answer reading (DEC23 src/evaluator.py:44-70) -------------------------
MCC_CASES = [  # (output, label, task, ours)
    ("18 + 2 = 20 .\nTherefore, the answer is 20 .", "20", "GSM8K", True),
    ("Therefore, the answer is 20 .\nThat was easy.", "20", "GSM8K", True),  # theirs: the last line only
    ("The answer is 1,000 .", "1000", "GSM8K", True),  # commas kept
    ("The answer is 1,000 .", "1,000", "GSM8K", True),
    ("The answer is 20 , not 21 .", "20", "GSM8K", False),  # both read the last number
    ("The answer is 3.50 .", "3.5", "GSM8K", True),
    ("Answer: (B)", "B", "CSQA", True),  # the A of "Answer" is read before (B): the last one is B
    ("The answer is (B) . A good choice .", "B", "CSQA", True),
    ("So the answer is 7 .", "7", "SVAMP", True),
    ("So the answer is twelve .", "12", "SVAMP", True),  # no digits on the line
    ("", "7", "SVAMP", False),
]


@pytest.mark.parametrize("output, label, task, ours", MCC_CASES)
def test_mcc_scoring_is_the_mcc_kd_authors_reading(output, label, task, ours):
    assert is_correct(extract_answer(output, task, "mcc"), label, task, "mcc") == dec23_hit(output, label, task)
    assert is_correct(extract_answer(output, task), label, task) == ours


def test_the_mcc_cases_are_ones_where_the_readings_differ():
    assert sum(dec23_hit(o, lbl, t) != ours for o, lbl, t, ours in MCC_CASES) >= 5


# ----- the MCC-KD authors' accuracy (HEAD src/evaluator.py:189-197) -----------------------------
OUTPUTS = ["The answer is 18.", "I do not know.", "The answer is 7.", "", "So the answer is 3 apples.", "none"]
LABELS = ["18", "18", "8", "5", "3", "4"]


def test_authors_accuracy_drops_the_unanswered_from_the_denominator():
    acc = accuracy_of(OUTPUTS, LABELS, "GSM8K")
    preds = [extract_answer(o, "GSM8K") for o in OUTPUTS]
    theirs = head_accuracy(preds, [is_correct(p, lbl, "GSM8K") for p, lbl in zip(preds, LABELS)])
    got = acc.as_dict("authors")
    assert got["accuracy_answered"] == theirs["accuracy"] == 2 / 3
    assert got["answered"] == theirs["answered"] == 3 and acc.total - got["answered"] == theirs["miss"]
    assert got["accuracy"] == 2 / 6  # ours, beside: every item in the denominator
    assert "accuracy_answered" not in acc.as_dict()  # only on request
    assert Accuracy().as_dict("authors")["accuracy_answered"] == 0.0
    with pytest.raises(UserError, match="--report must be ours or authors"):
        acc.as_dict("head")


def test_infer_evaluate_scoring_and_report(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    rows = [
        {"output": "The answer is 43", "label": "( 70.0 - 27.0 )"},
        {"output": "( 70.0 - 27.0 )", "label": "( 70.0 - 27.0 )"},
        {"output": "0.1 + 0.2", "label": "0.3"},
        {"output": "2 ** 3", "label": "8"},
        {"output": "", "label": "8"},
    ]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def evaluate(**kw):
        infer.evaluate(task="SVAMP", predictions_file=str(preds), **kw)
        return json.loads(capsys.readouterr().out)

    assert evaluate() == {"accuracy": 3 / 5, "correct": 3, "total": 5, "unparsable": 1}
    exact = evaluate(scoring="exact", report="authors")
    assert exact["correct"] == 2 and exact["correct"] == sum(
        dss_correct(r["output"], r["label"], "SVAMP") for r in rows
    )
    assert exact["unparsable"] == 2 and exact["answered"] == 3 and exact["accuracy_answered"] == 2 / 3
    assert evaluate(scoring="mcc")["correct"] == 0  # no line of these ends in the label's number as written
    with pytest.raises(UserError, match="--scoring must be ours, exact or mcc"):
        infer.evaluate(task="SVAMP", predictions_file=str(preds), scoring="eval")


# ----- generation with --task and the training evaluation ---------------------------------------
@pytest.fixture(scope="module")
def greedy(tmp_path_factory, tiny_tokenizer, dist1):
    """A random tiny model, and a data file whose first 3 labels are its own greedy outputs (the
    last 3 labels not): exact scoring marks exactly those 3 right, ours none (the outputs state no
    answer the labels could be read as)."""
    root = tmp_path_factory.mktemp("scoring")
    cks.init("tiny-llama", str(root / "m"), tokenizer=tiny_tokenizer, seed=5)
    questions = [{"instruction": f"What is {i} + {2 * i} ?", "label": "0"} for i in range(6)]
    (root / "q.json").write_text(json.dumps(questions))
    common = dict(ckpt_dir=str(root / "m"), template="none", max_new_tokens=8, progress=False)
    infer.generate(data_file=str(root / "q.json"), output_file=str(root / "plain.jsonl"), **common)
    outputs = [json.loads(line)["output"] for line in open(root / "plain.jsonl")]
    assert all(o.strip() for o in outputs) and len(set(outputs[:3]) & set(outputs[3:])) == 0
    labelled = [{**q, "label": o if i < 3 else "0"} for i, (q, o) in enumerate(zip(questions, outputs))]
    (root / "labelled.json").write_text(json.dumps(labelled))
    # the same for a step-by-step model's label task, whose prompts carry the task prefix
    prefixed = [{**q, "instruction": task_instruction(q["instruction"], "label")} for q in questions]
    (root / "prefixed.json").write_text(json.dumps(prefixed))
    infer.generate(data_file=str(root / "prefixed.json"), output_file=str(root / "label_task.jsonl"), **common)
    label_task = [json.loads(line)["output"] for line in open(root / "label_task.jsonl")]
    labelled = [{**q, "label": o if i < 3 else "0"} for i, (q, o) in enumerate(zip(questions, label_task))]
    (root / "labelled_label_task.json").write_text(json.dumps(labelled))
    return root, common, outputs


def test_generation_with_task_scores_as_asked(greedy, capsys):
    root, common, outputs = greedy
    out = root / "exact.jsonl"
    data = str(root / "labelled.json")
    infer.generate(data_file=data, output_file=str(out), task="ARITH", scoring="exact", report="authors", **common)
    lines = [json.loads(line) for line in open(out)]
    assert [r["correct"] for r in lines] == [True] * 3 + [False] * 3
    assert [r["prediction"] for r in lines] == [o.strip() for o in outputs]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["correct"] == 3 and summary["answered"] == 6 and summary["accuracy_answered"] == 0.5
    ours = root / "ours.jsonl"
    infer.generate(data_file=data, output_file=str(ours), task="ARITH", **common)
    assert sum(json.loads(line)["correct"] for line in open(ours)) < 3
    with pytest.raises(UserError, match="was written with --scoring 'exact', not 'ours'"):
        infer.generate(data_file=data, output_file=str(out), task="ARITH", **common)
    meta_path = str(ours) + ".meta.json"  # a file written before --scoring existed resumes as ours
    meta = json.load(open(meta_path))
    del meta["scoring"]
    json.dump(meta, open(meta_path, "w"))
    infer.generate(data_file=data, output_file=str(ours), task="ARITH", **common)


def one_evaluation(common, save, train_file, label_file, scoring) -> dict:
    """Flags of a one-step ARITH run that evaluates at its start under --scoring."""
    return dict(task="ARITH", ckpt_dir=common["ckpt_dir"], save_dir=str(save), train_file=str(train_file),
                label_file=str(label_file), template="none", max_new_tokens=common["max_new_tokens"], max_steps=1,
                eval_at_start=True, scoring=scoring)


def test_training_evaluation_scores_as_asked(greedy, tmp_path):
    """train_mcc.py --scoring exact --report authors --eval_at_start True: the evaluation of the
    initial model (its greedy outputs are the labels of 3 of 6 records) scores them exactly."""
    root, common, _ = greedy
    rationales = ["2 + 3 = 5 . Therefore, the answer is 5 .", "3 + 2 = 5 . Therefore, the answer is 5 ."]
    (tmp_path / "t.json").write_text(
        json.dumps([{"instruction": "What is 2 + 3 ?", "output": rationales, "label": "5"}])
    )
    for scoring, correct in (("exact", 3), ("ours", 0)):
        save = tmp_path / scoring
        train_mcc.main(**one_evaluation(common, save, tmp_path / "t.json", root / "labelled.json", scoring),
                       report="authors")
        first = next(json.loads(line) for line in open(save / "metrics.jsonl") if '"eval"' in line)
        assert first["correct"] == correct and first["total"] == 6, first
        assert first["answered"] == 6 - first["unparsable"] and "accuracy_answered" in first


def test_step_by_step_label_task_scores_as_asked(greedy, tmp_path):
    """train.py --objective step_by_step --scoring exact: the label task (the step-by-step authors'
    exact match) is scored exactly; the rationale task keeps ours (a rationale never equals a label)."""
    root, common, _ = greedy
    rec = {"instruction": "What is 2 + 3 ?", "output": "2 + 3 = 5 . Therefore, the answer is 5 .", "label": "5"}
    (tmp_path / "t.json").write_text(json.dumps([rec] * 2))
    for scoring, correct in (("exact", 3), ("ours", 0)):
        save = tmp_path / scoring
        train.main(objective="step_by_step",
                   **one_evaluation(common, save, tmp_path / "t.json", root / "labelled_label_task.json", scoring))
        first = next(json.loads(line) for line in open(save / "metrics.jsonl") if '"eval"' in line)
        assert first["correct"] == correct and first["total"] == 6, first
