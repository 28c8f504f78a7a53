"""Accuracy of a model's answers: counts (unparsable outputs are wrong, never dropped), and greedy
generation on labelled records during training; rationale BLEU and calibration error."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, List, Optional

from engine.runtime.errors import DataError
from engine.text.answers import extract_answer, is_correct, parse_label
from engine.text.records import read_records, require_field


@dataclass
class Accuracy:
    correct: int = 0
    total: int = 0
    unparsable: int = 0  # outputs with no readable answer
    unparsable_labels: int = 0  # gold labels that cannot be read for the task (scored wrong)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def add(self, prediction: Optional[str], label, task: str) -> bool:
        ok = is_correct(prediction, label, task)
        self.count(prediction, ok, parse_label(label, task) is not None)
        return ok

    def count(self, prediction: Optional[str], ok: bool, label_readable: bool = True) -> None:
        self.total += 1
        self.correct += bool(ok)
        self.unparsable += prediction is None
        self.unparsable_labels += not label_readable

    def as_dict(self) -> dict:
        out = {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "unparsable": self.unparsable}
        if self.unparsable_labels:  # only where there are some: clean data reads as before
            out["unparsable_labels"] = self.unparsable_labels
        return out


def accuracy_of(texts: Iterable[str], labels: Iterable, task: str) -> Accuracy:
    acc = Accuracy()
    for text, label in zip(texts, labels):
        acc.add(extract_answer(text, task), label, task)
    return acc


def references_of(record: dict) -> List[str]:
    """The teacher rationales of a record ('output': a string or a list of them), empty ones left out."""
    out = record.get("output")
    items = out if isinstance(out, list) else [out]
    return [o for o in items if isinstance(o, str) and o.strip()]


# ----------------------------------------------------------------------------------------------
# Rationale quality: corpus BLEU (sacreBLEU's default: 13a tokenisation, 4-grams, exp smoothing)
# ----------------------------------------------------------------------------------------------
# Our own ~50 lines rather than the sacrebleu package: it would bring five more pinned packages
# (lxml, regex, portalocker, tabulate, colorama) for one function; tests/test_step_by_step.py
# checks this one against a hand computation and against numbers sacrebleu 2.5.1 printed.
BLEU_ORDER = 4
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]


def tokenize_13a(line: str) -> List[str]:
    """The mteval-v13a tokenisation (sacreBLEU's default) of one line, as a list of tokens."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: List[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_statistics(hypotheses: List[str], references: List[List[str]]) -> List[float]:
    """Additive corpus statistics [hypothesis length, reference length, matches of 1..4-grams,
    hypothesis 1..4-grams]: sum them over shards of a corpus, then bleu_from_statistics. Each
    hypothesis has one or more references; n-gram matches are clipped by the most any reference
    holds, and the reference length is the closest one (the shorter on a tie)."""
    stats = [0.0] * (2 + 2 * BLEU_ORDER)
    for hyp, refs in zip(hypotheses, references):
        h = tokenize_13a(hyp)
        rs = [tokenize_13a(r) for r in refs]
        stats[0] += len(h)
        stats[1] += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, BLEU_ORDER + 1):
            counts = _ngrams(h, n)
            most = Counter()
            for r in rs:
                most |= _ngrams(r, n)
            stats[1 + n] += sum(min(c, most[g]) for g, c in counts.items())
            stats[1 + BLEU_ORDER + n] += max(0, len(h) - n + 1)
    return stats


def bleu_from_statistics(stats: List[float]) -> dict:
    """Corpus BLEU (0-100) from bleu_statistics: the geometric mean of the clipped n-gram precisions
    times the brevity penalty exp(1 - ref/hyp) when the hypotheses are shorter. A precision with no
    match is smoothed as 100 / (2^k x total) for its k-th such order ('exp'); no unigram match, 0."""
    sys_len, ref_len = stats[0], stats[1]
    matches, totals = stats[2 : 2 + BLEU_ORDER], stats[2 + BLEU_ORDER :]
    precisions, smooth = [0.0] * BLEU_ORDER, 1.0
    for n in range(BLEU_ORDER):
        if totals[n] == 0:
            break
        if matches[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * totals[n])
        else:
            precisions[n] = 100.0 * matches[n] / totals[n]
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    if matches[0] == 0:
        score = 0.0
    else:
        score = bp * math.exp(sum(math.log(p) if p > 0 else -9999999999 for p in precisions) / BLEU_ORDER)
    return {
        "bleu": score,
        "precisions": precisions,
        "brevity_penalty": bp,
        "hyp_len": int(sys_len),
        "ref_len": int(ref_len),
    }


def corpus_bleu(hypotheses: List[str], references: List[List[str]]) -> dict:
    """Corpus BLEU of hypotheses against their references (one list of references per hypothesis)."""
    return bleu_from_statistics(bleu_statistics(hypotheses, references))


# ----------------------------------------------------------------------------------------------
# Calibration: expected calibration error over equal-width confidence bins
# ----------------------------------------------------------------------------------------------
def calibration_bins(confidences: List[float], correct: List[bool], num_bins: int = 10) -> dict:
    """Expected calibration error: sum over bins of (examples in the bin / all) x |accuracy -
    mean confidence| in the bin, bins [0, 1/n), [1/n, 2/n) ... [(n-1)/n, 1] of equal width (a
    confidence of exactly 1 falls in the last). Returns {"ece", "bins": [{lo, hi, count, accuracy,
    confidence}], "count"}."""
    bins = [
        {"lo": b / num_bins, "hi": (b + 1) / num_bins, "count": 0, "correct": 0, "confidence_sum": 0.0}
        for b in range(num_bins)
    ]
    for conf, ok in zip(confidences, correct):
        b = bins[min(int(conf * num_bins), num_bins - 1)]
        b["count"] += 1
        b["correct"] += bool(ok)
        b["confidence_sum"] += conf
    n = sum(b["count"] for b in bins)
    ece = 0.0
    for b in bins:
        b["accuracy"] = b["correct"] / b["count"] if b["count"] else None
        b["confidence"] = b.pop("confidence_sum") / b["count"] if b["count"] else None
        if b["count"]:
            ece += b["count"] / n * abs(b["accuracy"] - b["confidence"])
    return {"ece": ece, "count": n, "bins": bins}


# ----------------------------------------------------------------------------------------------
# The bodies of `infer.py evaluate` and `infer.py bleu` (flags: engine/infer/args.py)
# ----------------------------------------------------------------------------------------------
def file_accuracy(args) -> dict:
    """Accuracy of args.field of every record of args.predictions_file against the labels (its own, or
    args.label_file's in the same order); a list field scores each of its items."""
    preds = read_records(args.predictions_file, required=())
    require_field(preds, args.predictions_file, args.field)
    labels_src = read_records(args.label_file, required=()) if args.label_file else preds
    if len(labels_src) != len(preds):
        raise DataError(f"{args.label_file} has {len(labels_src)} records but {args.predictions_file} has {len(preds)}")
    acc = Accuracy()
    for i, (p, label) in enumerate(zip(preds, labels_src)):
        if "label" not in label:
            raise DataError(f"{args.label_file or args.predictions_file} record {i} lacks the key 'label'")
        value = p.get(args.field, "")
        for text in (value if isinstance(value, list) else [value]) or [""]:
            acc.add(extract_answer(text if isinstance(text, str) else "", args.task), label["label"], args.task)
    return acc.as_dict()


def file_bleu(args) -> dict:
    """Corpus BLEU of args.field of args.predictions_file against args.reference_field of
    args.references_file (a string, or a list: several references), record by record."""
    preds = read_records(args.predictions_file, required=())
    refs = read_records(args.references_file, required=())
    if len(refs) != len(preds):
        raise DataError(f"{args.references_file} has {len(refs)} records but {args.predictions_file} has {len(preds)}")
    hyps, references = [], []
    for i, (p, r) in enumerate(zip(preds, refs)):
        if not isinstance(p.get(args.field), str):
            raise DataError(f"{args.predictions_file} record {i}: '{args.field}' must be one generated text (a string)")
        value = r.get(args.reference_field)
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(x, str) and x.strip() for x in items):
            raise DataError(
                f"{args.references_file} record {i}: '{args.reference_field}' must be a non-empty "
                f"rationale or a list of them"
            )
        hyps.append(p[args.field])
        references.append(items)
    result = corpus_bleu(hyps, references)
    return {
        "bleu": round(result["bleu"], 4),
        "records": len(hyps),
        "precisions": [round(x, 4) for x in result["precisions"]],
        "brevity_penalty": round(result["brevity_penalty"], 6),
        "hyp_len": result["hyp_len"],
        "ref_len": result["ref_len"],
    }
