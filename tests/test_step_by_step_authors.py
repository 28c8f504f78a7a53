"""Distilling step-by-step against the authors' code (google-research/distilling-step-by-step @ ef944263):
their teacher-output split on their own CQA data (every record) and on hand SVAMP cases, CSQA labels
as choice text or letter (trained and scored alike), their held-out 10% and --subsample selections
against the indices the datasets package draws, their --model_type standard baseline, and what the
label task trains on and is evaluated with (--label_type llm, the evaluator's task prefix)."""

import json
import os
import re
import types

import pytest
import torch

import train
from data.prepare_step_by_step import authors_split, main as prepare_main, parse_teacher_output
from engine.distill.step_by_step.data import (
    LabelSource,
    StepByStepData,
    authors_training_indices,
    train_test_split_indices,
)
from engine.distill.step_by_step.evaluator import StepByStepEvaluator
from engine.infer.metrics import accuracy_of, file_accuracy
from engine.runtime.errors import UserError
from engine.text.answers import choices_in, extract_answer, is_correct, parse_label, unreadable_labels
from engine.text.sequences import IGNORE
from engine.text.tokenizer import load_tokenizer
from engine.train.evaluator import Decoding
from tests.conftest import shared_path
from tests.helpers import arith_and_model, assert_same_run

INFO = types.SimpleNamespace(dp_rank=0, dp_size=1, is_main=True)


# ----- the authors' code, written out (data_utils.py @ ef944263) ----------------------------------
def authors_parse_cqa(output):
    """data_utils.py:167-179, CQADatasetLoader._parse_llm_output."""
    rationale_label = output.split('Q:')[0]
    rationale_label = rationale_label.rstrip()
    rationale, label = rationale_label.split('So the answer is')
    rationale = rationale.rstrip()
    try:
        label = re.split(r'\(.\)', label)[1].strip()
        label = label if label[-1] != '.' else label[:-1]
    except:  # noqa: E722 -- theirs
        label = ' '
    return rationale, label


def authors_parse_svamp(output):
    """data_utils.py:254-270, SVAMPDatasetLoader._parse_llm_output (ASDiv's, :327-343, is the same)."""
    rationale_label = output.split('Q:')[0]
    rationale_label = rationale_label.rstrip()
    try:
        rationale, label = rationale_label.split('The answer is')
    except:  # noqa: E722
        return ' ', ' '
    rationale = rationale.rstrip()
    try:
        label = re.search(r'\(.*\)', label).group(0)
    except:  # noqa: E722
        label = ' '
    return rationale, label


def authors_cqa_input(example):
    """data_utils.py:146-157: the input, and the gold label, cos_e's 'answer' (the choice's text)."""
    question, c = example['question'], example['choices']
    return (f'{question}\nAnswer Choices:\n(a) {c[0]}\n(b) {c[1]}\n(c) {c[2]}\n(d) {c[3]}\n(e) {c[4]}',
            example['answer'])


def authors_cqa_records(data_dir, split, n_files):
    """data_utils.py:82-95 (load_llm_preds) over train_batch_idxs = range(10), test_batch_idxs = range(2)
    (:137-138): the records and the teacher outputs, paired in order."""
    records = [json.loads(line) for line in open(os.path.join(data_dir, f"cqa_{split}.json")) if line.strip()]
    outputs = []
    for idx in range(n_files):
        outputs += json.load(open(os.path.join(data_dir, "llm", f"{split}_CoT_{idx}.json")))
    assert len(records) == len(outputs)
    return records, outputs


# ----- 1. the rationale/label split --------------------------------------------------------------
def test_the_authors_split_on_their_own_cqa_data(tmp_path):
    """Every one of the 9,741 + 1,221 records of the authors' CQA layout: our converter's default
    gives their rationale (without the answer sentence), their teacher label (the choice's text, " "
    where they find none), their gold label and their input. Records their parser raises on would be
    dropped; there are none in this data, so all are kept."""
    data_dir = shared_path("data", "step_by_step", "cqa")
    total = 0
    for split, n_files in (("train", 10), ("test", 2)):
        records, outputs = authors_cqa_records(data_dir, split, n_files)
        expected = []
        for rec, output in zip(records, outputs):
            try:
                rationale, llm_label = authors_parse_cqa(output)
            except ValueError:  # their run.py aborts here; ours drops the record
                continue
            instruction, label = authors_cqa_input(rec)
            expected.append({"id": rec["id"], "instruction": instruction, "output": rationale, "label": label,
                             "llm_label": llm_label})
        prepare_main(str(tmp_path / f"{split}.json"), dataset_dir=data_dir, split=split)
        out = json.load(open(tmp_path / f"{split}.json"))
        assert len(out) == len(expected) == len(records)
        for ours, theirs in zip(out, expected):
            assert ours == theirs
        total += len(out)
    assert total == 10962
    # ours (--parse ours) keeps the answer sentence: their rationale, then "So the answer is ..."
    prepare_main(str(tmp_path / "ours.json"), dataset_dir=data_dir, split="test", parse="ours", label_format="letter")
    ours = json.load(open(tmp_path / "ours.json"))
    assert len(ours) == 1221
    for rec, theirs in zip(ours, expected):
        assert rec["output"].startswith(theirs["output"] + " So the answer is ")
        assert rec["label"] == "ABCDE"[choices_in(rec["instruction"]).index(theirs["label"])]


SVAMP_CASES = [
    "He had 32 and ate 5.0. The answer is (32.0 - 5.0).\n\nQ: Next one. The answer is (1 + 1).",
    "So the answer is (32 - 5).",  # no "The answer is" (capital T): theirs (' ', ' ')
    "3 * 4 = 12. The answer is 12.",  # no equation: label ' '
    "First (2 + 3), then times 4. The answer is ((2 + 3) * 4). Check: (20).",  # greedy: to the last ')'
    "It is (1 + 1). The answer is (1 + 1). The answer is (2).",  # twice: theirs (' ', ' ')
    "x = 5\nThe answer is (10 / 2)",
    "Q: no rationale at all. The answer is (1 + 2).",
]


def test_the_authors_split_on_svamp_cases(tmp_path):
    """SVAMP: split at "The answer is", the label the greedy "(...)"; a text they cannot split gives
    them an empty rationale, which we drop; against their function on hand cases and through the
    converter's --dataset_dir."""
    kept = []
    for text in SVAMP_CASES:
        rationale, label = authors_parse_svamp(text)
        ours = authors_split(text, "SVAMP")
        if rationale.strip():
            assert ours == (rationale, label, ""), text
            kept.append((rationale, label))
        else:
            assert ours == (None, None, "no_rationale"), text
    assert kept[0] == ("He had 32 and ate 5.0.", "(32.0 - 5.0)") and kept[2][1] == "((2 + 3) * 4). Check: (20)"
    d = tmp_path / "svamp"
    (d / "llm").mkdir(parents=True)
    rows = [{"input": f"question {i}", "label": "( 1.0 + 2.0 )"} for i in range(len(SVAMP_CASES))]
    (d / "svamp_train.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "llm" / "train_CoT_0.json").write_text(json.dumps(SVAMP_CASES))
    prepare_main(str(tmp_path / "out.json"), dataset_dir=str(d))
    assert [(r["output"], r["llm_label"]) for r in json.load(open(tmp_path / "out.json"))] == kept
    prepare_main(str(tmp_path / "ours.json"), dataset_dir=str(d), parse="ours")
    assert json.load(open(tmp_path / "ours.json"))[0]["output"] == "He had 32 and ate 5.0. The answer is (32.0 - 5.0)."
    with pytest.raises(UserError, match="--label_format is for multiple-choice tasks"):
        prepare_main(str(tmp_path / "o2.json"), dataset_dir=str(d), label_format="letter")
    with pytest.raises(UserError, match="--parse 'mine' is not one of authors, ours"):
        prepare_main(str(tmp_path / "o2.json"), dataset_dir=str(d), parse="mine")


def test_tasks_without_an_authors_loader_split_at_their_answer_sentence():
    text = "4 + 7 = 11 . 11 + 9 = 20 . Therefore, the answer is 20 .\n\nQ: What is 1 + 2 + 3 ?"
    assert authors_split(text, "ARITH") == ("4 + 7 = 11 . 11 + 9 = 20 .", "20", "")
    assert parse_teacher_output(text, "ARITH")[0] == "4 + 7 = 11 . 11 + 9 = 20 . Therefore, the answer is 20 ."


# ----- 2. CSQA labels as text or letter ----------------------------------------------------------
CHOICES = ["park", "coloring book", "garden center", "math problem", "gravity"]
QUESTION = "What is this an example of?\nAnswer Choices:\n" + "\n".join(
    f"({'abcde'[i]}) {c}" for i, c in enumerate(CHOICES))


def test_a_text_answer_reads_as_its_choice():
    assert choices_in(QUESTION) == CHOICES and choices_in("predict: " + QUESTION) == CHOICES
    assert choices_in("What is 2 + 3 ?") is None
    assert extract_answer("math problem", "CSQA", choices=CHOICES) == "D"
    assert extract_answer(" Math  Problem.", "CSQA", choices=CHOICES) == "D"
    assert extract_answer("Only gravity pulls. So the answer is gravity.", "CSQA", choices=CHOICES) == "E"
    assert extract_answer("So the answer is (b) coloring book.", "CSQA", choices=CHOICES) == "B"
    assert extract_answer("math problem", "CSQA") is None  # the text alone names no letter
    assert extract_answer("aquarium or", "CSQA", choices=CHOICES) is None
    for label in ("math problem", "D", "(d) math problem"):
        assert parse_label(label, "CSQA", choices=CHOICES) == "D"
        assert is_correct(extract_answer("math problem", "CSQA", choices=CHOICES), label, "CSQA", choices=CHOICES)
        assert not is_correct(extract_answer("park", "CSQA", choices=CHOICES), label, "CSQA", choices=CHOICES)
    twice = ["hotel", "bank", "hotel", "mall", "park"]  # a text two choices share reads as the first
    assert is_correct(extract_answer("hotel", "CSQA", choices=twice), "hotel", "CSQA", choices=twice)
    records = [{"instruction": QUESTION, "label": "math problem"}, {"instruction": "Q?", "label": "math problem"}]
    assert unreadable_labels(records, "CSQA") == [1]
    acc = accuracy_of(["math problem", "gravity", "D"], ["math problem"] * 3, "CSQA", choices=[CHOICES] * 3)
    assert (acc.correct, acc.total, acc.unparsable) == (2, 3, 0)


def test_the_label_task_trains_and_scores_text_labels(tiny_tokenizer, tmp_path):
    """The label task's target is the record's label as written: the choice's text (or a teacher text
    naming no choice, as the authors train on it), --label_type llm its 'llm_label'; a blank teacher
    label (the authors' ' ') leaves the record out. Evaluation, in training and from files, scores
    text labels through the choices the instruction lists."""
    tok = load_tokenizer(tiny_tokenizer)
    records = [{"instruction": QUESTION, "output": "Numbers in a story make a problem.", "label": "math problem",
                "llm_label": llm} for llm in ("gravity", "aquarium or", " ", "math problem")]

    def targets(data, task="label"):
        return {i: tok.decode([t for t in data.example(task, i, 0)[1] if t != IGNORE and t != tok.eos_id])
                for i in data.keep}

    gt = StepByStepData(records, tok, 96, "none", labels=LabelSource("CSQA", "gt"))
    assert targets(gt) == {i: "math problem" for i in range(4)}
    llm = StepByStepData(records, tok, 96, "none", labels=LabelSource("CSQA", "llm"))
    assert targets(llm) == {0: "gravity", 1: "aquarium or", 3: "math problem"}
    assert (llm.blank_labels, llm.unnamed_labels) == (1, 1)
    assert "1 left out (a blank teacher label); 1 teacher labels name no choice" in llm.describe()
    with pytest.raises(UserError, match="record 0: 'label' 'zoo' is not an answer of --task CSQA"):
        StepByStepData([{**records[0], "label": "zoo"}], tok, 96, "none", labels=LabelSource("CSQA"))

    ev = StepByStepEvaluator([{"instruction": QUESTION, "label": "math problem"}] * 3, tok, INFO,
                             Decoding("CSQA", template="none"))
    ev.label.texts = lambda model: ["math problem", "gravity", "D"]  # the gold text, a wrong choice, a letter
    result = ev(types.SimpleNamespace(head_weight=torch.zeros(1)))
    assert (result["correct"], result["total"], result["unparsable"]) == (2, 3, 0)
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"output": t}) + "\n" for t in ("math problem", "park")))
    labels = tmp_path / "l.json"
    labels.write_text(json.dumps([{"instruction": QUESTION, "label": "math problem"}] * 2))
    args = types.SimpleNamespace(predictions_file=str(preds), label_file=str(labels), field="output", output_file=None,
                                 task="CSQA", scoring="ours", report="ours")
    assert file_accuracy(args)["correct"] == 1


def test_infer_scores_text_labels_through_the_choices(run_dir, dist1, tmp_path):
    """infer.py (generation with --task, and calibration) reads a CSQA label given as a choice's text:
    an output that is the text of the labelled choice is right, another choice's text wrong. The
    choice (c) is set to what the model answers when (c) is listed so (a fixed point of one token)."""
    import infer

    job = {"ckpt_dir": str(run_dir / "m1"), "template": "none", "max_new_tokens": 1}

    def record(i, text):
        listed = "\n".join(f"({x}) {c}" for x, c in zip("abcde", ["zq", "other", text, "wz", "qq"]))
        return {"instruction": f"Question {i} ?\nAnswer Choices:\n{listed}", "label": text}

    records = []
    for i in range(6):
        text = "start"
        for step in range(6):
            (tmp_path / "q.json").write_text(json.dumps([record(i, text)]))
            infer.generate(**job, data_file=str(tmp_path / "q.json"), output_file=str(tmp_path / f"q{i}{step}.jsonl"),
                           progress=False)
            said = json.loads(open(tmp_path / f"q{i}{step}.jsonl").readline())["output"]
            if said == text or not said.strip() or "\n" in said:
                break
            text = said
        if said == text and text.strip() and text.strip() == text:
            records.append(record(i, text))
    assert records, "no fixed point found"
    records.append({**records[0], "label": "other"})
    data = tmp_path / "csqa.json"
    data.write_text(json.dumps(records))
    expected = [True] * (len(records) - 1) + [False]
    infer.generate(**job, data_file=str(data), output_file=str(tmp_path / "g.jsonl"), task="CSQA", progress=False)
    assert [json.loads(line)["correct"] for line in open(tmp_path / "g.jsonl")] == expected
    infer.calibration(**job, data_file=str(data), output_file=str(tmp_path / "c.jsonl"), task="CSQA")
    assert [json.loads(line)["correct"] for line in open(tmp_path / "c.jsonl")] == expected


def test_the_evaluator_decodes_the_label_task_with_its_prefix(tiny_tokenizer):
    """Evaluation in training prompts the label task as it was trained: 'predict: ' + the instruction
    (the authors' T5 prefix, run.py:140), the rationale task 'explain: '; --standard: no prefix."""
    tok = load_tokenizer(tiny_tokenizer)
    records = [{"instruction": "What is 2 + 3 ?", "label": "5", "output": "2 + 3 = 5 ."}]
    ev = StepByStepEvaluator(records, tok, INFO, Decoding("ARITH", max_new_tokens=8, template="none"),
                             rationale_task=True)
    assert ev.label.instructions == ["predict: What is 2 + 3 ?"]
    assert ev.rationale.instructions == ["explain: What is 2 + 3 ?"]
    assert ev.label.prompts(64)[0] == tok.encode("predict: What is 2 + 3 ?", bos=True)
    plain = StepByStepEvaluator(records, tok, INFO, Decoding("ARITH", template="none"),
                                prefixes={"label": "", "rationale": ""})
    assert plain.label.instructions == ["What is 2 + 3 ?"]


def test_label_type_llm_trains_on_the_teachers_label(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    records = [{"instruction": "What is 1 + 2 ?", "output": "1 + 2 = 4 . The answer is 4 .", "label": "3",
                "llm_label": "4"},
               {"instruction": "What is 2 + 2 ?", "output": "2 + 2 = 5 . The answer is 5 .", "label": "4"}]
    for label_type, expected in (("gt", ["3", "4"]), ("llm", ["4", "5"])):
        data = StepByStepData(records, tok, 64, "none", labels=LabelSource("ARITH", label_type))
        got = [tok.decode([t for t in data.example("label", i, 0)[1] if t not in (IGNORE, tok.eos_id)])
               for i in data.keep]
        assert got == expected, label_type


# ----- 3. the held-out split, --subsample, --standard ---------------------------------------------
# Indices the datasets package (5.2.0, numpy 2.4.6) gave for run.py's two draws:
#   d = Dataset.from_dict({"i": list(range(n))})
#   if subsample < 1.0: d = d.train_test_split(test_size=1.0 - subsample, seed=run)['train']   # run.py:79-80
#   s = d.train_test_split(test_size=0.1, seed=0); s['train']['i']                              # run.py:95-101
DATASETS_DRAWS = {
    (10, 0.7, 0): [9, 1, 8, 3, 5],  # 1.0 - 0.7 = 0.30000000000000004: ceil(3.0000000000000004) = 4 drawn away
    (40, 0.7, 3): [34, 19, 22, 5, 35, 18, 36, 0, 16, 31, 4, 37, 27, 1, 13, 10, 39, 6, 8, 14, 15, 7, 25, 9],
    (12, 1.0, 0): [7, 4, 5, 11, 0, 3, 6, 10, 8, 1],
}
DATASETS_SUBSAMPLE_ONLY = {(10, 0.7, 0): [3, 5, 9, 0, 8, 1], (12, 0.5, 1): [1, 9, 2, 10, 6, 3]}
CQA_DRAWS = {1.0: (8766, [50, 4943, 8192, 9704, 2094, 4339, 4888, 3447]),  # CQA's 9,741 training records
             0.5: (4383, [5993, 5420, 1667, 626, 2134, 1068, 6815, 7340])}


def _datasets_train_test_split(n, test_size, seed):
    """datasets' Dataset.train_test_split for a float test_size (src/datasets/arrow_dataset.py @ b7cb10b0):
    n_test = ceil(test_size * n_samples) :5126; n_train = n_samples - n_test :5136;
    generator = np.random.default_rng(seed) :5164; permutation = generator.permutation(len(self));
    test_indices = permutation[:n_test]; train_indices = permutation[n_test:(n_test + n_train)] :5226-5228."""
    import math

    import numpy as np

    n_test = math.ceil(test_size * n)
    permutation = np.random.default_rng(seed).permutation(n)
    return list(permutation[n_test:n_test + (n - n_test)]), list(permutation[:n_test])


def test_the_authors_selection_is_datasets_train_test_split():
    for (n, subsample, run), expected in DATASETS_DRAWS.items():
        assert authors_training_indices(n, subsample, run, 0.1, 0) == expected
    for (n, subsample, run), expected in DATASETS_SUBSAMPLE_ONLY.items():
        assert authors_training_indices(n, subsample, run) == expected
    for subsample, (count, first) in CQA_DRAWS.items():
        got = authors_training_indices(9741, subsample, 0, 0.1, 0)
        assert len(got) == count and got[:8] == first
    for n, size, seed in ((9741, 0.1, 0), (7, 0.5, 3), (100, 0.3, 1)):
        assert train_test_split_indices(n, size, seed) == _datasets_train_test_split(n, size, seed)
    assert authors_training_indices(5) == [0, 1, 2, 3, 4]  # neither flag: every record


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer):
    return arith_and_model(tmp_path_factory.mktemp("sbs_authors"), tiny_tokenizer, "tiny-llama", "m1", n_train=12,
                           n_test=4, data_seed=2, model_seed=3)


def _flags(root, **kw):
    return {"objective": "step_by_step", "task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 1e-3,
            "max_steps": 3, "save_every": 3, "train_file": str(root / "arith" / "train.json"), "max_batch_size": 4,
            "ckpt_dir": str(root / "m1"), **kw}


def test_held_out_and_subsampled_records_are_never_trained_on(run_dir, dist1, tmp_path):
    """--subsample 0.75 --holdout_fraction 0.25 --seed 1 trains exactly as a file holding only the
    records the authors' draws keep: the same losses and weights, step for step."""
    records = json.load(open(run_dir / "arith" / "train.json"))
    kept = sorted(_datasets_kept(len(records), 0.75, 1, 0.25, 0))
    assert len(kept) == 6
    only = tmp_path / "kept.json"
    only.write_text(json.dumps([records[i] for i in kept]))
    train.main(**_flags(run_dir, seed=1, subsample=0.75, holdout_fraction=0.25, save_dir=str(tmp_path / "held")))
    train.main(**_flags(run_dir, seed=1, train_file=str(only), save_dir=str(tmp_path / "file")))
    assert_same_run(str(tmp_path / "held"), str(tmp_path / "file"), tol=0.0)


def _datasets_kept(n, subsample, run, holdout, holdout_seed):
    """run.py:79-80 then :95 with the datasets draw written out above."""
    idx = list(range(n))
    if subsample < 1.0:
        idx = [idx[i] for i in _datasets_train_test_split(n, 1.0 - subsample, run)[0]]
    return [idx[i] for i in _datasets_train_test_split(len(idx), holdout, holdout_seed)[0]]


def test_standard_is_plain_fine_tuning_without_prefixes(run_dir, dist1, tmp_path):
    """--standard True (the authors' --model_type standard, run.py:154-167): the bare instruction ->
    label, the same losses and weights as SFT on those pairs; no task prefixes are recorded, so
    infer.py prompts it as a plain model. --alpha 0 with it: the bare instruction -> rationale."""
    records = json.load(open(run_dir / "arith" / "train.json"))
    for alpha, field in ((None, "label"), (0.0, "output")):
        sft = tmp_path / f"sft-{field}.json"
        sft.write_text(json.dumps([{"instruction": r["instruction"], "output": r[field]} for r in records]))
        extra = {} if alpha is None else {"alpha": alpha}
        train.main(**_flags(run_dir, standard=True, save_dir=str(tmp_path / f"std-{field}"), **extra))
        base = _flags(run_dir, train_file=str(sft), save_dir=str(tmp_path / f"plain-{field}"))
        base.pop("objective")
        train.main(**base)
        assert_same_run(str(tmp_path / f"std-{field}"), str(tmp_path / f"plain-{field}"), tol=0.0)
        saved = json.load(open(tmp_path / f"std-{field}" / "checkpoint-3" / "prompt_template.json"))
        assert "task_prefixes" not in saved


def test_bad_selection_flags_are_one_sentence(run_dir, dist1, tmp_path):
    def err(**kw):
        with pytest.raises(UserError) as e:
            train.main(**_flags(run_dir, save_dir=str(tmp_path / "s"), max_steps=1, **kw))
        return str(e.value)

    assert err(subsample=0.0) == "--subsample must be in (0, 1] (the fraction of --train_file trained on), got 0.0"
    assert err(holdout_fraction=1.0) == ("--holdout_fraction must be in [0, 1) (the fraction left out of training), "
                                         "got 1.0")
    assert err(standard=True, alpha=0.5) == ("--standard True trains one task without task prefixes: --alpha must "
                                             "be 1 (the label task, the default) or 0 (the rationale task) and "
                                             "--beta 0; got --alpha 0.5 --beta 0.0")
    assert err(subsample=0.01) == (f"--subsample 0.01 and --holdout_fraction 0.0 leave none of the 12 records of "
                                   f"{run_dir / 'arith' / 'train.json'} to train on")
