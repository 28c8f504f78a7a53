"""Accuracy of a model's answers: counts (unparsable outputs are wrong, never dropped; the MCC-KD
authors' answered-only accuracy reported beside on request), rationale BLEU and calibration error."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from engine.runtime.errors import DataError, UserError
from engine.runtime.fileio import atomic_open, disk_errors
from engine.text.answers import answer_key, choices_in, extract_answer, is_correct, parse_label
from engine.text.records import read_records, require_field

REPORTS = ("ours", "authors")


def check_report(report: str) -> str:
    if report not in REPORTS:
        raise UserError(f"--report must be ours or authors, got {report!r}")
    return report


@dataclass
class Accuracy:
    """Counts of scored answers. `accuracy` is ours: correct / all, an output without a readable
    answer counted wrong. The MCC-KD authors' (HEAD src/evaluator.py:189-197) drops those from the
    denominator: `accuracy_answered` = correct / answered, reported beside ours with report=authors."""

    correct: int = 0
    total: int = 0
    unparsable: int = 0  # outputs with no readable answer
    unparsable_labels: int = 0  # gold labels that cannot be read for the task (scored wrong)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def answered(self) -> int:
        return self.total - self.unparsable

    @property
    def accuracy_answered(self) -> float:
        return self.correct / self.answered if self.answered else 0.0

    def add(self, prediction: Optional[str], label, task: str, scoring: str = "ours", choices=None) -> bool:
        ok = is_correct(prediction, label, task, scoring, choices)
        self.count(prediction, ok, parse_label(label, task, scoring, choices) is not None)
        return ok

    def count(self, prediction: Optional[str], ok: bool, label_readable: bool = True) -> None:
        self.total += 1
        self.correct += bool(ok)
        self.unparsable += prediction is None
        self.unparsable_labels += not label_readable

    def as_dict(self, report: str = "ours") -> dict:
        out = {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "unparsable": self.unparsable}
        if self.unparsable_labels:  # only where there are some: clean data reads as before
            out["unparsable_labels"] = self.unparsable_labels
        if check_report(report) == "authors":
            out.update(accuracy_answered=self.accuracy_answered, answered=self.answered)
        return out


def accuracy_of(texts: Iterable[str], labels: Iterable, task: str, scoring: str = "ours",
                choices: Optional[list] = None) -> Accuracy:
    """Accuracy of `texts` against `labels`; `choices`, one list (or None) per text, let CSQA answers and
    labels be choice texts (engine.text.answers.choices_in of each record's instruction)."""
    acc = Accuracy()
    for text, label, options in zip(texts, labels, choices or itertools.repeat(None)):
        acc.add(extract_answer(text, task, scoring, options), label, task, scoring, options)
    return acc


# ----------------------------------------------------------------------------------------------
# Several samples per record: self-consistency (majority vote, maj@k) and pass@k
# ----------------------------------------------------------------------------------------------
def majority_vote(predictions: List[Optional[str]], task: str, scoring: str = "ours") -> Tuple[Optional[str], int]:
    """Self-consistency (Wang et al. 2023): the answer most samples state, answers equal by value
    (answer_key) counting as one, a tie going to the answer stated first; samples without an answer
    cast no vote. Returns (that answer as its first sample wrote it, its votes), (None, 0) if none."""
    votes, first = Counter(), {}
    for p in predictions:
        key = answer_key(p, task, scoring)
        if key is not None:
            votes[key] += 1
            first.setdefault(key, p)
    if not votes:
        return None, 0
    key, n = max(votes.items(), key=lambda kv: (kv[1], -list(first).index(kv[0])))
    return first[key], n


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. (2021) from n samples of which c are correct:
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct one."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def vote_fields(predictions: List[Optional[str]], oks: List[bool], label, task: str, scoring: str = "ours",
                choices=None) -> dict:
    """The per-record fields of several samples: the majority answer, its votes, whether it is
    right, and whether any sample is (pass@k with k = the number of samples)."""
    answer, n = majority_vote(predictions, task, scoring)
    return {"majority": answer, "majority_votes": n,
            "majority_correct": is_correct(answer, label, task, scoring, choices), "pass": any(oks)}


@dataclass
class SampleAccuracy:
    """maj@k, pass@k and pass@1 over records of several samples each (k: the samples per record)."""

    records: int = 0
    majority_correct: int = 0
    passed: int = 0
    pass_at_1_sum: float = 0.0
    sizes: tuple = ()

    def add(self, oks: List[bool], majority_correct: bool) -> None:
        self.records += 1
        self.majority_correct += bool(majority_correct)
        self.passed += any(oks)
        self.pass_at_1_sum += pass_at_k(len(oks), sum(map(bool, oks)), 1) if oks else 0.0
        self.sizes = tuple(sorted(set(self.sizes) | {len(oks)}))

    def as_dict(self) -> dict:
        n = max(self.records, 1)
        k = self.sizes[0] if len(self.sizes) == 1 else list(self.sizes)
        return {"samples_per_record": k, "maj_at_k": self.majority_correct / n, "pass_at_k": self.passed / n,
                "pass_at_1": self.pass_at_1_sum / n, "majority_correct": self.majority_correct,
                "pass_correct": self.passed}


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
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_statistics(
    hypotheses: List[str], references: List[List[str]], reference_length: str = "closest"
) -> List[float]:
    """Additive corpus statistics [hypothesis length, reference length, matches of 1..4-grams,
    hypothesis 1..4-grams]: sum them over shards of a corpus, then bleu_from_statistics. Each
    hypothesis has one or more references; n-gram matches are clipped by the most any reference
    holds, and the reference length is the closest one (the shorter on a tie; sacreBLEU's) or the
    `shortest` (tensorflow/nmt's, which HF evaluate's bleu runs)."""
    stats = [0.0] * (2 + 2 * BLEU_ORDER)
    for hyp, refs in zip(hypotheses, references):
        h = tokenize_13a(hyp)
        rs = [tokenize_13a(r) for r in refs]
        stats[0] += len(h)
        if reference_length == "shortest":
            stats[1] += min(len(r) for r in rs)
        else:
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
    matches, totals = stats[2:2 + BLEU_ORDER], stats[2 + BLEU_ORDER:]
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
    return {"bleu": score, "precisions": precisions, "brevity_penalty": bp, "hyp_len": int(sys_len),
            "ref_len": int(ref_len)}


def corpus_bleu(hypotheses: List[str], references: List[List[str]]) -> dict:
    """Corpus BLEU of hypotheses against their references (one list of references per hypothesis)."""
    return bleu_from_statistics(bleu_statistics(hypotheses, references))


# The authors' rationale BLEU (Chen et al. 2024, explain_test.py:54-57, 114): HF evaluate's bleu of each
# record alone (tensorflow/nmt's compute_bleu: 13a tokens, 4-grams, no smoothing, the shortest
# reference, 0-1), averaged over records.
BLEU_KINDS = ("corpus", "sentence_mean")


def sentence_bleu(hypothesis: str, references: List[str]) -> float:
    """Unsmoothed BLEU (0-1) of one hypothesis against its references, as HF evaluate's bleu computes
    it for a one-record corpus: 0 when any n-gram order up to 4 has no match (or the hypothesis is
    shorter than 4 tokens), the brevity penalty exp(1 - ref/hyp) against the shortest reference. An
    empty hypothesis scores 0 (tensorflow/nmt's compute_bleu divides by zero there)."""
    stats = bleu_statistics([hypothesis], [references], reference_length="shortest")
    hyp_len, ref_len = stats[0], stats[1]
    matches, possible = stats[2 : 2 + BLEU_ORDER], stats[2 + BLEU_ORDER :]
    if hyp_len == 0 or ref_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matches, possible)) / BLEU_ORDER
    ratio = hyp_len / ref_len
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio)
    return bp * math.exp(log_precision)


def mean_sentence_bleu(hypotheses: List[str], references: List[List[str]]) -> dict:
    """The authors' rationale BLEU: the mean over records of sentence_bleu (0-1), with the count of
    empty hypotheses (each scored 0)."""
    scores = [sentence_bleu(h, refs) for h, refs in zip(hypotheses, references)]
    return {
        "bleu": sum(scores) / len(scores) if scores else 0.0,
        "records": len(scores),
        "empty_predictions": sum(not tokenize_13a(h) for h in hypotheses),
    }


# ----------------------------------------------------------------------------------------------
# Calibration: expected calibration error over equal-width or equal-mass confidence bins
# ----------------------------------------------------------------------------------------------
BINNINGS = ("equal_width", "equal_mass")
DEFAULT_BINS = {"equal_width": 10, "equal_mass": 100}  # ours (Guo et al.'s 10); the authors' 100


def equal_width_bins(confidences: List[float], num_bins: int) -> List[int]:
    """The bin of each confidence: [0, 1/n), [1/n, 2/n) ... [(n-1)/n, 1] (exactly 1: the last)."""
    return [min(int(conf * num_bins), num_bins - 1) for conf in confidences]


def equal_mass_bins(confidences: List[float], num_bins: int, tiebreak: Optional[List[tuple]] = None) -> List[int]:
    """The bin of each confidence as Chen et al.'s ece_equal_mass (calib_metrics.py:44-52) forms them:
    sorted by confidence (ties by `tiebreak`, theirs sorts (prob, pred, label) tuples; default: the
    input order), then ceil(N / num_bins) per bin in that order, so every used bin but the last is
    full and the bins after it stay empty (N = 1221, 100 bins: 13 each in bins 0-92, 12 in bin 93)."""
    keys = tiebreak if tiebreak is not None else [(i,) for i in range(len(confidences))]
    order = sorted(range(len(confidences)), key=lambda i: (confidences[i], *keys[i]))
    per_bin = math.ceil(len(confidences) / num_bins) if confidences else 1
    bins = [0] * len(confidences)
    for rank, i in enumerate(order):
        bins[i] = rank // per_bin
    return bins


def calibration_bins(
    confidences: List[float],
    correct: List[bool],
    num_bins: int = 10,
    binning: str = "equal_width",
    tiebreak: Optional[List[tuple]] = None,
) -> dict:
    """Expected calibration error: sum over bins of (examples in the bin / all) x |accuracy - mean
    confidence| in the bin, over equal_width_bins or equal_mass_bins. Returns {"ece", "count",
    "bins": [{lo, hi, count, correct, accuracy, confidence}]}: lo/hi are the bin's edges (equal width)
    or its lowest and highest confidence (equal mass; None when empty)."""
    if binning == "equal_mass":
        where = equal_mass_bins(confidences, num_bins, tiebreak)
    else:
        where = equal_width_bins(confidences, num_bins)
    members = [[] for _ in range(num_bins)]
    for i, b in enumerate(where):
        members[b].append(i)
    n, ece, bins = len(confidences), 0.0, []
    for b, idx in enumerate(members):
        confs = [confidences[i] for i in idx]
        right = sum(bool(correct[i]) for i in idx)
        if binning == "equal_mass":
            lo, hi = (min(confs), max(confs)) if confs else (None, None)
        else:
            lo, hi = b / num_bins, (b + 1) / num_bins
        accuracy = right / len(idx) if idx else None
        confidence = sum(confs) / len(idx) if idx else None
        if idx:
            ece += len(idx) / n * abs(accuracy - confidence)
        bins.append(
            {"lo": lo, "hi": hi, "count": len(idx), "correct": right, "accuracy": accuracy, "confidence": confidence}
        )
    return {"ece": ece, "count": n, "bins": bins}


# ----------------------------------------------------------------------------------------------
# The bodies of `infer.py evaluate` and `infer.py bleu` (flags: engine/infer/args.py)
# ----------------------------------------------------------------------------------------------
def file_accuracy(args) -> dict:
    """Accuracy of args.field of every record of args.predictions_file against the labels (its own, or
    args.label_file's in the same order); a list field scores each of its items, and adds maj@k and
    pass@k over them. With args.output_file, each record's answers and scores as JSON lines."""
    preds = read_records(args.predictions_file, required=())
    require_field(preds, args.predictions_file, args.field)
    labels_src = read_records(args.label_file, required=()) if args.label_file else preds
    if len(labels_src) != len(preds):
        raise DataError(f"{args.label_file} has {len(labels_src)} records but {args.predictions_file} has "
                        f"{len(preds)}")
    acc, samples, lines = Accuracy(), SampleAccuracy(), []
    for i, (p, label) in enumerate(zip(preds, labels_src)):
        if "label" not in label:
            raise DataError(f"{args.label_file or args.predictions_file} record {i} lacks the key 'label'")
        value = p.get(args.field, "")
        options = choices_in(label.get("instruction", p.get("prompt")))  # CSQA labels may be choice texts
        texts = [t if isinstance(t, str) else "" for t in ((value if isinstance(value, list) else [value]) or [""])]
        answers = [extract_answer(t, args.task, args.scoring, options) for t in texts]
        oks = [acc.add(a, label["label"], args.task, args.scoring, options) for a in answers]
        line = {"id": p.get("id", i), "index": i, "label": label["label"]}
        if isinstance(value, list):
            line.update(prediction=answers, correct=oks, **vote_fields(answers, oks, label["label"], args.task,
                                                                       args.scoring, options))
            samples.add(oks, line["majority_correct"])
        else:
            line.update(prediction=answers[0], correct=oks[0])
        lines.append(line)
    if args.output_file:
        with disk_errors(args.output_file), atomic_open(args.output_file, "w") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    return {**acc.as_dict(args.report), **(samples.as_dict() if samples.records else {})}


def file_bleu(args) -> dict:
    """BLEU of args.field of args.predictions_file against args.reference_field of
    args.references_file (a string, or a list: several references), record by record: corpus BLEU
    (0-100) or, with args.bleu sentence_mean, the authors' mean of per-record BLEU (0-1)."""
    preds = read_records(args.predictions_file, required=())
    refs = read_records(args.references_file, required=())
    if len(refs) != len(preds):
        raise DataError(f"{args.references_file} has {len(refs)} records but {args.predictions_file} has "
                        f"{len(preds)}")
    hyps, references = [], []
    for i, (p, r) in enumerate(zip(preds, refs)):
        if not isinstance(p.get(args.field), str):
            raise DataError(f"{args.predictions_file} record {i}: '{args.field}' must be one generated text "
                            f"(a string)")
        value = r.get(args.reference_field)
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(x, str) and x.strip() for x in items):
            raise DataError(f"{args.references_file} record {i}: '{args.reference_field}' must be a non-empty "
                            f"rationale or a list of them")
        hyps.append(p[args.field])
        references.append(items)
    if args.bleu == "sentence_mean":
        result = mean_sentence_bleu(hyps, references)
        return {**result, "bleu": round(result["bleu"], 6), "kind": "sentence_mean", "scale": "0-1"}
    result = corpus_bleu(hyps, references)
    return {
        "bleu": round(result["bleu"], 4),
        "kind": "corpus",
        "scale": "0-100",
        "records": len(hyps),
        "precisions": [round(x, 4) for x in result["precisions"]],
        "brevity_penalty": round(result["brevity_penalty"], 6),
        "hyp_len": result["hyp_len"],
        "ref_len": result["ref_len"],
    }
