"""Several samples per record: the majority vote (self-consistency, maj@k) and pass@k, per record and
in the summary, through infer.py generation and infer.py evaluate; few-shot prompts (--prompt_file)."""
import itertools
import json

import pytest

import checkpoint_split as cks
import infer
from engine.infer.metrics import majority_vote, pass_at_k
from engine.text.prompts import few_shot_prompt, read_prompt_file
from tests.conftest import shared_path


def _brute_pass_at_k(oks, k) -> float:
    """The fraction of the k-subsets of the samples holding a correct one (the estimator's definition)."""
    subsets = list(itertools.combinations(oks, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample():
    for oks in ([1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 0, 0], [0, 0, 0], [1, 1]):
        for k in range(1, len(oks) + 1):
            assert pass_at_k(len(oks), sum(oks), k) == pytest.approx(_brute_pass_at_k(oks, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote_counts_equal_values_once_and_breaks_ties_by_first_stated():
    assert majority_vote(["72", "72.0", "5", None, "5"], "GSM8K") == ("72", 2)  # tie: 72 stated first
    assert majority_vote(["5", "72.00", "72", None, None], "GSM8K") == ("72.00", 2)
    assert majority_vote([None, None], "GSM8K") == (None, 0)
    assert majority_vote(["B", "C", "C"], "CSQA") == ("C", 2)
    assert majority_vote(["2 + 3", "5", "1 + 4"], "SVAMP", "exact") == ("2 + 3", 3)  # values under exact
    assert majority_vote(["1,000", "1000", "1000"], "GSM8K", "mcc") == ("1000", 2)  # mcc: as written


def test_evaluate_writes_votes_per_record_and_maj_pass_in_the_summary(tmp_path, capsys):
    records = [{"output": ["So the answer is 3 .", "The answer is 4 .", "The answer is 3.0 ."], "label": "3"},
               {"output": ["The answer is 9 .", "The answer is 8 .", "The answer is 9 ."], "label": "8"},
               {"output": ["no idea", "The answer is 1 .", "nothing"], "label": "2"},
               {"output": ["The answer is 7 .", "The answer is 7 .", "The answer is 7 ."], "label": "7"}]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in records))
    infer.evaluate(task="GSM8K", predictions_file=str(preds), output_file=str(tmp_path / "scored.jsonl"))
    summary = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    assert [r["majority"] for r in lines] == ["3", "9", "1", "7"]
    assert [r["majority_votes"] for r in lines] == [2, 2, 1, 3]
    assert [r["majority_correct"] for r in lines] == [True, False, False, True]
    assert [r["pass"] for r in lines] == [True, True, False, True]
    assert (summary["correct"], summary["total"]) == (6, 12)  # every sample, as before
    assert summary["maj_at_k"] == 0.5 and summary["pass_at_k"] == 0.75 and summary["samples_per_record"] == 3
    assert summary["pass_at_1"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 1) / 4)
    with pytest.raises(Exception, match="is the --predictions_file"):
        infer.evaluate(task="GSM8K", predictions_file=str(preds), output_file=str(preds))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("sc")
    cks.init("tiny-llama", str(root / "m"), tokenizer=tiny_tokenizer, seed=3)
    (root / "q.json").write_text(json.dumps([{"instruction": f"What is {a} + {b} ?", "label": str(a + b)}
                                             for a, b in [(1, 2), (3, 4), (5, 5), (2, 7), (6, 1)]]))
    return root


def test_generation_with_samples_votes_as_evaluate_does(tiny, tmp_path, capsys, dist1):
    """Sampling is seeded per record and sample: a first run finds what the random model says, and the
    second, on labels taken from it (the last sample's answer), has right and wrong samples to count."""
    job = dict(ckpt_dir=str(tiny / "m"), task="ARITH", template="none", max_new_tokens=12, num_samples=4,
               temperature=1.5, progress=False)
    infer.generate(data_file=str(tiny / "q.json"), output_file=str(tmp_path / "first.jsonl"), **job)
    said = [json.loads(line)["prediction"] for line in open(tmp_path / "first.jsonl")]
    records = json.load(open(tiny / "q.json"))
    for rec, preds in zip(records, said):
        rec["label"] = preds[-1] or "3"
    (tmp_path / "q.json").write_text(json.dumps(records))
    out = tmp_path / "o.jsonl"
    infer.generate(data_file=str(tmp_path / "q.json"), output_file=str(out), **job)
    summary = json.load(open(str(out) + ".meta.json"))["summary"]
    lines = [json.loads(line) for line in open(out)]
    assert [r["prediction"] for r in lines] == said
    for r in lines:
        assert r["majority"] == majority_vote(r["prediction"], "ARITH")[0] and r["pass"] == any(r["correct"])
    assert summary["samples_per_record"] == 4 and summary["records"] == len(lines) == 5
    assert summary["pass_at_k"] == sum(r["pass"] for r in lines) / 5 > 0
    assert summary["maj_at_k"] == sum(r["majority_correct"] for r in lines) / 5
    assert summary["pass_at_1"] == pytest.approx(sum(sum(r["correct"]) / 4 for r in lines) / 5)
    assert 0 < summary["pass_at_1"] < summary["pass_at_k"]
    capsys.readouterr()
    infer.evaluate(task="ARITH", predictions_file=str(out))
    again = json.loads(capsys.readouterr().out)
    assert all(again[k] == summary[k] for k in ("maj_at_k", "pass_at_k", "pass_at_1", "correct", "total"))


def test_few_shot_prompts_from_the_shared_files(tmp_path):
    question = "Tom has 3 apples and buys 2 more. How many apples does he have?\n"
    cot = read_prompt_file(shared_path("data", "prompts", "gsm8k_complex_cot.txt"))
    direct = read_prompt_file(shared_path("data", "prompts", "gsm8k_direct.txt"))
    assert few_shot_prompt(cot, question) == cot + "\n\nQuestion: " + question.strip() + "\nLet's think step by step\n"
    assert few_shot_prompt(direct, question) == direct + "\n\nQuestion: " + question.strip() + "\n"
    (tmp_path / "own.txt").write_text("Q: 1 + 1 ?\nA: 2\n\nQ: {instruction}\nA:")
    assert few_shot_prompt(read_prompt_file(str(tmp_path / "own.txt")), "2 + 2 ?") == "Q: 1 + 1 ?\nA: 2\n\nQ: 2 + 2 ?\nA:"
    (tmp_path / "mixed.txt").write_text("Q: 1 + 1 ?\nA: 2\n\nProblem: 2 + 2 ?\nA: 4\n")
    with pytest.raises(Exception, match="do not all start with the same 'Name:'"):
        read_prompt_file(str(tmp_path / "mixed.txt"))


def test_generation_reads_the_few_shot_prompt(tiny, tmp_path, dist1):
    demos = tmp_path / "demos.txt"
    demos.write_text("Question: What is 2 + 2 ?\nThe answer is 4 .\n\nQuestion: What is 1 + 3 ?\nThe answer is 4 .\n")
    out = tmp_path / "o.jsonl"
    infer.generate(ckpt_dir=str(tiny / "m"), data_file=str(tiny / "q.json"), output_file=str(out), task="ARITH",
                   max_new_tokens=4, prompt_file=str(demos), progress=False)
    first = json.loads(open(out).readline())
    assert first["prompt"] == demos.read_text().strip() + "\n\nQuestion: What is 1 + 2 ?\n"
    meta = json.load(open(str(out) + ".meta.json"))
    assert meta["template"] == "none" and meta["stop"] == ["\nQuestion:"] and meta["prompt_sha256"]
