"""MCC-KD data: questions with several teacher rationales and their answer spans."""
from __future__ import annotations

from typing import List

from engine.runtime.errors import DataError
from engine.text.answers import answer_char_span, extract_answer, find_answer_span, is_correct, span_spells
from engine.text.prompts import format_prompt
from engine.text.records import validate_training_records
from engine.text.sequences import IGNORE, stable_rng


class MultiRationaleData:
    """Questions with several teacher rationales each (MCC-KD). Per epoch each question contributes
    `num_rationales` of its rationales (a seeded draw by (seed, epoch, question)) whose answer spans
    are the same tokens, so every pair among them can be compared token for token (an answer spelt
    `▁C` in one rationale and `C` in another is never paired).

    With a `task`, rationales whose extracted answer differs from the label are dropped and counted
    (their "span" would be some intermediate number), unless `keep_wrong`. Spans come from the
    record's `indices` when present (validated: the tokens there must spell the answer) or are found
    automatically. Questions with fewer than 2 usable rationales are dropped and counted, never
    failing mid-epoch."""

    def __init__(self, records: List[dict], tokenizer, max_seq_len: int, template: str = "default",
                 seed: int = 0, path: str = "train_file", num_rationales: int = 2, use_file_indices: bool = True,
                 task: str = None, keep_wrong: bool = False):
        if num_rationales < 2:
            raise DataError(f"--num_rationales must be >= 2, got {num_rationales}")
        validate_training_records(records, path, need_label=True)
        self.tok, self.max_seq_len, self.seed, self.k = tokenizer, max_seq_len, seed, num_rationales
        self.records, self.filter_answers = records, bool(task) and not keep_wrong
        self.prompts, self.responses, self.spans, self.groups = [], [], [], []
        self.stats = {"questions": len(records), "rationales": 0, "wrong_answer": 0, "no_span": 0, "too_long": 0,
                      "other_span_tokens": 0, "dropped_questions": 0}
        for i, rec in enumerate(records):
            prompt = tokenizer.encode(format_prompt(rec["instruction"], template), bos=True)
            outs = rec["output"] if isinstance(rec["output"], list) else [rec["output"]]
            resp = [tokenizer.encode(o, bos=False, eos=True) for o in outs]
            self.stats["rationales"] += len(outs)
            spans, by_tokens = [], {}
            for j, (r, o) in enumerate(zip(resp, outs)):
                if self.filter_answers and not is_correct(extract_answer(o, task), rec["label"], task):
                    self.stats["wrong_answer"] += 1
                    spans.append(None)
                    continue
                sp = self._span(i, j, prompt, r, o, rec, path) if use_file_indices else \
                    find_answer_span(tokenizer, r, o, rec["label"])
                spans.append(sp)
                if sp is None:
                    self.stats["no_span"] += 1
                elif len(prompt) + sp[1] > max_seq_len:
                    self.stats["too_long"] += 1
                else:
                    by_tokens.setdefault(tuple(r[sp[0]:sp[1]]), []).append(j)
            best = max(by_tokens.values(), key=len, default=[])
            self.stats["other_span_tokens"] += sum(map(len, by_tokens.values())) - len(best)
            self.prompts.append(prompt)
            self.responses.append(resp)
            self.spans.append(spans)
            self.groups.append(best if len(best) >= 2 else [])
        self.keep = [i for i, g in enumerate(self.groups) if g]
        self.stats["dropped_questions"] = len(records) - len(self.keep)
        if not self.keep:
            raise DataError(f"{path}: no question has 2 or more correct rationales whose answer spans are the "
                            f"same tokens ({self.describe()})")

    def _span(self, i, j, prompt, resp, text, rec, path):
        """The file's indices for rationale j, validated; found automatically when the file has none.
        Understood: positions within the rationale's own tokens, or counted over the whole sequence as
        the MCC-KD authors' files are (BOS + instruction + rationale, the instruction raw or in our
        template), with an exclusive or inclusive end."""
        raw = rec.get("indices")
        if raw is None:
            return find_answer_span(self.tok, resp, text, rec["label"])
        try:
            entry = raw[j]
            if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], (list, tuple)):
                entry = entry[0]
            s, e = int(entry[0]), int(entry[1])
        except (IndexError, TypeError, ValueError):
            raise DataError(f"{path} record {i}: 'indices' needs one [start, end] per rationale "
                            f"(rationale {j} has none)") from None
        chars = answer_char_span(text, rec["label"])
        answer = text[chars[0]:chars[1]] if chars else str(rec["label"])
        raw_prompt = len(self.tok.encode(rec["instruction"], bos=True))
        for off in dict.fromkeys((0, len(prompt), raw_prompt)):  # response-relative, then whole-sequence positions
            for end in (e, e + 1):  # exclusive end, or inclusive as some files write it
                if span_spells(self.tok, resp, s - off, end - off, answer):
                    return s - off, end - off
        if not (0 <= s < e <= max(len(prompt), raw_prompt) + len(resp)):
            raise DataError(f"{path} record {i}: indices [{s}, {e}] of rationale {j} are out of range")
        raise DataError(f"{path} record {i}: indices [{s}, {e}] of rationale {j} do not spell the answer "
                        f"{rec['label']!r}, counted within the rationale or over BOS + instruction + rationale; "
                        f"pass --recompute_spans True to find the spans anew")

    def __len__(self) -> int:
        return len(self.keep)

    def choose(self, index: int, epoch: int) -> List[int]:
        group = self.groups[index]
        rng = stable_rng("mcc", self.seed, epoch, index)
        return sorted(rng.sample(group, min(self.k, len(group))))

    def example(self, index: int, which: int):
        prompt, resp = self.prompts[index], self.responses[index][which]
        seq = (prompt + resp)[: self.max_seq_len + 1]
        labels = [IGNORE] * (len(prompt) - 1) + seq[len(prompt):]
        s, e = self.spans[index][which]
        return seq[:-1], labels[: len(seq) - 1], (len(prompt) + s, len(prompt) + e)

    def length(self, index: int, epoch: int) -> int:
        return max(min(len(self.prompts[index]) + len(self.responses[index][j]), self.max_seq_len)
                   for j in self.choose(index, epoch))

    def describe(self) -> str:
        st = self.stats
        wrong = (f"{st['wrong_answer']} reach another answer than the label (dropped; --keep_wrong_rationales "
                 f"True keeps them), " if self.filter_answers else "")
        return (f"{len(self.keep)} of {st['questions']} questions usable ({st['dropped_questions']} dropped with "
                f"fewer than 2 rationales whose answer spans are the same tokens); of {st['rationales']} "
                f"rationales, {wrong}{st['no_span']} without a findable answer span, {st['too_long']} with the "
                f"span cut by --max_seq_len, {st['other_span_tokens']} spelling the answer with other tokens "
                f"than the rest")
