"""From raw teacher rationales to an MCC-KD training file (fire CLI).

  python data/prepare_mcc.py --input_file RAW --output_file OUT.json --tokenizer T --num_rationales 3

RAW: the seed's format (a JSON list of {"instruction", "output": [rationales], "label"}, e.g.
shared/data/mcc/SVAMP/train.json) or the JSON lines of `infer.py --num_samples K`. For every
question: keep the rationales whose extracted answer equals the label, drop duplicates, find the
answer span of each with the student's tokenizer, keep the largest set whose spans are the same
tokens, and choose the `num_rationales` most diverse of them (lowest pairwise word n-gram
Jaccard similarity). Writes {"instruction", "output": [...], "label", "indices": [[s, e], ...]}
(indices: [start, end) of the answer tokens within each rationale's own tokens) and prints how
many questions and rationales were kept and why the others were dropped. An existing output file
is never replaced unless --overwrite True, and never when it is the input file.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime.outputs import writes  # noqa: E402


def ngrams(text: str, n: int) -> set:
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def most_diverse(texts: List[str], k: int, n: int = 3) -> List[int]:
    """Indices of k texts chosen greedily for the lowest pairwise n-gram Jaccard similarity: the
    least similar pair first, then each time the text least similar (max over chosen) to the rest."""
    if len(texts) <= k:
        return list(range(len(texts)))
    grams = [ngrams(t, n) for t in texts]
    sim = [[jaccard(a, b) for b in grams] for a in grams]
    pairs = [(sim[i][j], i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    _, i, j = min(pairs)
    chosen = [i, j]
    while len(chosen) < k:
        rest = [c for c in range(len(texts)) if c not in chosen]
        chosen.append(min(rest, key=lambda c: (max(sim[c][x] for x in chosen), c)))
    return sorted(chosen)


def prepare(records: List[dict], tokenizer, num_rationales: int, task: str, n: int = 3, path: str = "input"):
    from engine.runtime.errors import DataError
    from engine.text.answers import extract_answer, find_answer_span, is_correct

    out = []
    q_stats, r_stats = Counter(), Counter()
    for i, rec in enumerate(records):
        if "label" not in rec or rec["label"] in (None, ""):
            raise DataError(f"{path} record {i} lacks the key 'label'")
        if not isinstance(rec.get("instruction"), str):
            raise DataError(f"{path} record {i} lacks the key 'instruction'")
        raw = rec.get("output")
        raw = raw if isinstance(raw, list) else [raw] if isinstance(raw, str) else []
        for j, text in enumerate(raw):
            if not isinstance(text, str):
                raise DataError(f"{path} record {i}: 'output' item {j} is {type(text).__name__ if text is not None else 'null'}, "
                                f"not a rationale (a string)")
        r_stats["in"] += len(raw)
        seen, correct = set(), []
        for text in raw:
            text = text.strip()
            if not is_correct(extract_answer(text, task), rec["label"], task):
                r_stats["wrong answer"] += 1
            elif text in seen:
                r_stats["duplicate"] += 1
            else:
                seen.add(text)
                correct.append(text)
        spans, ids_of = {}, {}
        for text in correct:
            ids_of[text] = tokenizer.encode(text, bos=False, eos=True)
            span = find_answer_span(tokenizer, ids_of[text], text, rec["label"])
            if span is None:
                r_stats["no answer span"] += 1
            else:
                spans[text] = span
        by_tokens = {}  # rationales are paired only when their answer spans are the same tokens
        for text, (s, e) in spans.items():
            by_tokens.setdefault(tuple(ids_of[text][s:e]), []).append(text)
        group = max(by_tokens.values(), key=len, default=[])
        r_stats["answer spelt with other tokens"] += len(spans) - len(group)
        if len(group) < 2:
            reason = ("no correct rationale" if not correct else "one correct rationale" if len(correct) == 1
                      else "fewer than 2 rationales with the same answer tokens")
            q_stats[reason] += 1
            r_stats["question dropped"] += len(group)
            continue
        picked = [group[j] for j in most_diverse(group, num_rationales, n)]
        r_stats["not among the most diverse"] += len(group) - len(picked)
        r_stats["kept"] += len(picked)
        q_stats["kept"] += 1
        out.append({"instruction": rec["instruction"], "output": picked, "label": rec["label"],
                    "indices": [list(spans[t]) for t in picked]})
    return out, q_stats, r_stats


@writes("output_file", inputs=("tokenizer",))
def main(input_file: str, output_file: str, tokenizer: str, num_rationales: int = 3, task: str = "GSM8K",
         ngram: int = 3, overwrite: bool = False):
    """Filter, diversify and span-annotate raw teacher rationales into an MCC-KD training file.

    Args:
        input_file: raw rationales: the seed's JSON list (output = list of rationales) or infer.py JSON lines.
        output_file: the multi-rationale training JSON for train_mcc.py.
        tokenizer: the student's tokenizer (tokenizer.model / tokenizer.json, or a checkpoint directory).
        num_rationales: rationales kept per question (the most diverse ones).
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH: how answers are read to check them against the label.
        ngram: word n-gram size of the Jaccard diversity measure.
        overwrite: replace an existing output_file (never the input_file itself).
    """
    from engine.runtime.errors import DataError
    from engine.runtime.fileio import atomic_write_text
    from engine.text.answers import check_task
    from engine.text.records import read_records
    from engine.text.tokenizer import load_tokenizer

    if num_rationales < 2:
        raise DataError(f"--num_rationales must be >= 2, got {num_rationales}")
    if ngram < 1:
        raise DataError(f"--ngram must be >= 1 (words per n-gram of the diversity measure), got {ngram}")
    task = check_task(task)
    tok = load_tokenizer(tokenizer)
    records = read_records(input_file, required=())
    out, q, r = prepare(records, tok, num_rationales, task, ngram, input_file)
    if not out:
        raise DataError(f"{input_file}: no question kept 2 or more correct rationales ({dict(q)})")
    atomic_write_text(output_file, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    dropped_q = {k: v for k, v in q.items() if k != "kept"}
    dropped_r = {k: v for k, v in r.items() if k not in ("in", "kept")}
    summary = {"questions": len(records), "questions_kept": q["kept"], "questions_dropped": dropped_q,
               "rationales": r["in"], "rationales_kept": r["kept"], "rationales_dropped": dropped_r,
               "output_file": output_file}
    print(f"kept {q['kept']} of {len(records)} questions and {r['kept']} of {r['in']} rationales")
    for k, v in sorted(dropped_q.items()):
        print(f"  questions dropped, {k}: {v}")
    for k, v in sorted(dropped_r.items()):
        print(f"  rationales dropped, {k}: {v}")
    print(json.dumps(summary))


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
