"""Data readers and training examples: records, supervised sequences, multi-rationale questions, batches."""
from __future__ import annotations

import json
import os
import random
import zlib
from typing import List, Optional, Sequence

import torch

from engine.answers import answer_char_span, extract_answer, find_answer_span, is_correct, parse_label, span_spells
from engine.errors import DataError
from engine.prompts import format_prompt


def read_text(path: str, what: str = "") -> str:
    """The UTF-8 text of a data file (`what`: the flag naming it in errors); one sentence otherwise."""
    name = f"{what} {path}" if what else path
    if not os.path.isfile(path):
        raise DataError(f"{name} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{name} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8") from None


def read_records(path: str, required: Sequence[str] = ("instruction",)) -> List[dict]:
    """A JSON list of objects or JSON lines; every record must hold the `required` keys as non-empty strings."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path} is empty")
    records = None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e})") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg}); expected a JSON list or JSON lines") from None
    if not records:
        raise DataError(f"{path} holds no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path} record {i} is not a JSON object")
        for key in required:
            if key not in rec:
                raise DataError(f"{path} record {i} lacks the key '{key}'")
            if not isinstance(rec[key], str):
                raise DataError(f"{path} record {i}: '{key}' must be a string, not {type(rec[key]).__name__}")
            if not rec[key].strip():
                raise DataError(f"{path} record {i}: '{key}' is empty")
    return records


# ----------------------------------------------------------------------------------------------
# Supervised examples: prompt (no loss) + response (loss) token ids
# ----------------------------------------------------------------------------------------------
IGNORE = -100


def _stable_rng(*parts):
    return random.Random(zlib.crc32(repr(parts).encode()))


def validate_training_records(records: List[dict], path: str, need_label: bool = False) -> None:
    for i, rec in enumerate(records):
        out = rec.get("output")
        if out is None:
            raise DataError(f"{path} record {i} lacks the key 'output'")
        if isinstance(out, list):
            if not out or not all(isinstance(o, str) for o in out):
                raise DataError(f"{path} record {i}: 'output' must be a string or a non-empty list of strings")
            empty = [j for j, o in enumerate(out) if not o.strip()]
            if empty:
                raise DataError(f"{path} record {i}: 'output' item {empty[0]} is empty")
        elif not isinstance(out, str):
            raise DataError(f"{path} record {i}: 'output' must be a string or a list of strings, "
                            f"not {type(out).__name__}")
        elif not out.strip():
            raise DataError(f"{path} record {i}: 'output' is empty")
        if need_label and "label" not in rec:
            raise DataError(f"{path} record {i} lacks the key 'label'")


class SFTData:
    """Records -> token ids for supervised training. A record whose `output` is a list contributes
    one rationale per epoch, drawn from (seed, epoch, record index) alone.

    Sequences: BOS + prompt + response + EOS; labels are the next token where it belongs to the
    response, IGNORE elsewhere. Too-long sequences are cut at max_seq_len (counted); records whose
    prompt alone fills max_seq_len are dropped (counted)."""

    def __init__(self, records: List[dict], tokenizer, max_seq_len: int, template: str = "default",
                 seed: int = 0, path: str = "train_file"):
        validate_training_records(records, path)
        self.records, self.tok, self.max_seq_len, self.seed = records, tokenizer, max_seq_len, seed
        self.prompts = [tokenizer.encode(format_prompt(r["instruction"], template), bos=True) for r in records]
        self._responses = {}
        self.keep = [i for i, p in enumerate(self.prompts) if len(p) < max_seq_len]
        self.dropped = len(records) - len(self.keep)
        if not self.keep:
            raise DataError(f"{path}: every prompt is at least --max_seq_len={max_seq_len} tokens long")
        self.truncated = sum(self.full_length(i, 0) > max_seq_len for i in self.keep)

    def describe(self) -> str:
        msg = f"{len(self)} training examples"
        if self.truncated:
            msg += f", {self.truncated} truncated to --max_seq_len={self.max_seq_len}"
        if self.dropped:
            msg += f", {self.dropped} dropped (prompt alone reaches --max_seq_len)"
        return msg

    def __len__(self) -> int:
        return len(self.keep)

    def choice(self, index: int, epoch: int) -> int:
        out = self.records[index]["output"]
        if not isinstance(out, list):
            return 0
        return _stable_rng(self.seed, epoch, index).randrange(len(out))

    def response(self, index: int, which: int) -> List[int]:
        key = (index, which)
        if key not in self._responses:
            out = self.records[index]["output"]
            text = out[which] if isinstance(out, list) else out
            self._responses[key] = self.tok.encode(text, bos=False, eos=True)
        return self._responses[key]

    def full_length(self, index: int, epoch: int) -> int:
        return len(self.prompts[index]) + len(self.response(index, self.choice(index, epoch)))

    def example(self, index: int, epoch: int, which: int = None):
        """(input_ids, labels), both of length <= max_seq_len, labels shifted to the next token."""
        which = self.choice(index, epoch) if which is None else which
        prompt, resp = self.prompts[index], self.response(index, which)
        seq = (prompt + resp)[: self.max_seq_len + 1]
        labels = [IGNORE] * (len(prompt) - 1) + seq[len(prompt):]
        return seq[:-1], labels[: len(seq) - 1]


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: bool = True) -> List[List[int]]:
    """Positions 0..n-1 grouped into batches of exactly batch_size for one epoch; the order depends
    only on (seed, epoch). Bucketing sorts windows of 32 batches by length to cut padding, then
    shuffles the batches. The last batch is completed with the epoch's first positions."""
    rng = _stable_rng("order", seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if len(order) % batch_size:
        order += order[: batch_size - len(order) % batch_size]
        while len(order) % batch_size:  # fewer records than one batch
            order += order[: batch_size - len(order) % batch_size]
    if bucket:
        window = batch_size * 32
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if bucket:
        rng.shuffle(batches)
    return batches


def pad_batch(pairs, pad_id: int):
    """[(input_ids, labels)] -> LongTensors [B, T] right-padded (labels padded with IGNORE)."""
    width = max(len(x) for x, _ in pairs)
    inputs = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for b, (x, y) in enumerate(pairs):
        inputs[b, : len(x)] = torch.tensor(x)
        labels[b, : len(y)] = torch.tensor(y)
    return inputs, labels


# ----------------------------------------------------------------------------------------------
# Answer spans (MCC-KD): the response tokens that spell the final answer
# ----------------------------------------------------------------------------------------------


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
        rng = _stable_rng("mcc", self.seed, epoch, index)
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


# ----------------------------------------------------------------------------------------------
# Distilling step-by-step: the label task x -> y and the rationale task x -> r of each question
# ----------------------------------------------------------------------------------------------
LABEL_TYPES = ("gt", "llm")


def step_by_step_label(rec: dict, index: int, path: str, task: str, label_type: str) -> str:
    """The label-task target of a record: its gold 'label' (gt), or the label its teacher reached (llm:
    'llm_label', else the answer its rationale states); one sentence when it does not read as a `task`
    answer."""
    if label_type == "gt":
        if rec.get("label") is None:
            raise DataError(f"{path} record {index} lacks the key 'label' (the label task's target with "
                            f"--label_type gt)")
        label = rec["label"]
        where = f"'label' {label!r}"
    elif rec.get("llm_label") is not None:
        label = rec["llm_label"]
        where = f"'llm_label' {label!r}"
    elif isinstance(rec.get("output"), str):
        label = extract_answer(rec["output"], task)
        where = f"the answer its rationale states ({label})"
    else:
        raise DataError(f"{path} record {index} has no 'llm_label' and no single rationale to read one from "
                        f"(--label_type llm)")
    text = "" if label is None or isinstance(label, bool) else str(label).strip()
    if parse_label(text, task) is None:
        raise DataError(f"{path} record {index}: {where} is not an answer of --task {task} (--label_type {label_type})")
    return text


class StepByStepData:
    """Records -> the two tasks of distilling step-by-step over one model, told apart by a task prefix
    of the instruction (engine.prompts.TASK_PREFIXES): `label` (instruction -> label, the gold one or
    the teacher's by `label_type`) and `rationale` (instruction -> the teacher's rationale; a list
    gives one per epoch, as SFTData). Only the `passes` asked for are built (and required of the
    records). Each pass is an SFTData; an example is a question kept by every pass."""

    def __init__(self, records: List[dict], tokenizer, max_seq_len: int, template: str = "default",
                 seed: int = 0, path: str = "train_file", task: str = "GSM8K", label_type: str = "gt",
                 passes=("label", "rationale"), prefixes: dict = None):
        from engine.prompts import TASK_PREFIXES, task_instruction

        if label_type not in LABEL_TYPES:
            raise DataError(f"--label_type {label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        self.prefixes, self.passes, self.tok = prefixes or TASK_PREFIXES, tuple(passes), tokenizer
        self.sets = {}
        if "rationale" in self.passes:
            for i, rec in enumerate(records):
                out = rec.get("output")
                if out is None or (isinstance(out, (str, list)) and not out):
                    raise DataError(f"{path} record {i} has no rationale ('output') for the rationale task")
            validate_training_records(records, path)
            self.sets["rationale"] = SFTData(
                [{"instruction": task_instruction(r["instruction"], "rationale", self.prefixes), "output": r["output"]}
                 for r in records], tokenizer, max_seq_len, template, seed, path)
        if "label" in self.passes:
            labels = [step_by_step_label(r, i, path, task, label_type) for i, r in enumerate(records)]
            self.sets["label"] = SFTData(
                [{"instruction": task_instruction(r["instruction"], "label", self.prefixes), "output": y}
                 for r, y in zip(records, labels)], tokenizer, max_seq_len, template, seed, path)
        kept = [set(s.keep) for s in self.sets.values()]
        self.keep = sorted(set.intersection(*kept))
        if not self.keep:
            raise DataError(f"{path}: no record fits --max_seq_len={max_seq_len} in every task")
        self.n_records = len(records)

    def __len__(self) -> int:
        return len(self.keep)

    def example(self, task: str, index: int, epoch: int):
        """(input_ids, labels) of record `index` in one task (see SFTData.example)."""
        return self.sets[task].example(index, epoch)

    def length(self, index: int, epoch: int) -> int:
        """Tokens of the question over its passes (for length bucketing)."""
        return sum(min(s.full_length(index, epoch), s.max_seq_len) for s in self.sets.values())

    def describe(self) -> str:
        parts = []
        for name, s in self.sets.items():
            part = f"{name} task"
            if s.truncated:
                part += f" ({s.truncated} truncated to --max_seq_len={s.max_seq_len})"
            parts.append(part)
        dropped = self.n_records - len(self.keep)
        return (f"{len(self)} training questions, each in the {' and the '.join(parts)}"
                + (f"; {dropped} dropped (a prompt alone reaches --max_seq_len)" if dropped else ""))


# ----------------------------------------------------------------------------------------------
# Data formats (data/make_formats.py): one format per batch
# ----------------------------------------------------------------------------------------------
FORMATS = ("icl_answer", "icl_cot", "zs_answer", "zs_cot")


def parse_formats(formats) -> Optional[List[str]]:
    """--formats "icl_cot,zs_cot" -> the names, checked; None/"" -> None (every format of the file)."""
    if formats is None or formats == "":
        return None
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats)]
    for name in names:
        if name not in FORMATS:
            raise DataError(f"--formats {name!r} is not one of {', '.join(FORMATS)}")
    if not names or len(set(names)) != len(names):
        raise DataError(f"--formats {formats!r} must name each format once")
    return names


def format_groups(records: List[dict], formats, path: str) -> Optional[List[Optional[str]]]:
    """The data format of each record when the file carries them (`format`, written by
    data/make_formats.py), None for records of formats left out by --formats; None when the file
    carries no formats and none were asked for (batches are then formed as always)."""
    names = parse_formats(formats)
    marked = [i for i, r in enumerate(records) if "format" in r]
    if not marked:
        if names:
            raise DataError(f"--formats {','.join(names)} needs records with a 'format' (written by "
                            f"data/make_formats.py), but {path} record 0 has none")
        return None
    if len(marked) != len(records):
        first = next(i for i, r in enumerate(records) if "format" not in r)
        raise DataError(f"{path} record {first} has no 'format' while record {marked[0]} has one")
    for i, r in enumerate(records):
        if r["format"] not in FORMATS:
            raise DataError(f"{path} record {i}: format {r['format']!r} is not one of {', '.join(FORMATS)}")
    present = {r["format"] for r in records}
    missing = [n for n in names or [] if n not in present]
    if missing:
        raise DataError(f"--formats asks for {missing[0]} but {path} holds no record of that format "
                        f"(it has {', '.join(sorted(present))})")
    chosen = set(names or present)
    return [r["format"] if r["format"] in chosen else None for r in records]


def grouped_epoch_batches(lengths: Sequence[int], groups: Sequence[Optional[str]], batch_size: int, seed: int,
                          epoch: int, bucket: bool = True) -> List[List[int]]:
    """epoch_batches within each group (each batch holds one data format; positions whose group is
    None are left out), then all batches shuffled together; depends only on (seed, epoch)."""
    batches = []
    for g in sorted({x for x in groups if x is not None}):
        members = [p for p, x in enumerate(groups) if x == g]
        group_seed = zlib.crc32(repr((seed, g)).encode())
        for b in epoch_batches([lengths[p] for p in members], batch_size, group_seed, epoch, bucket):
            batches.append([members[i] for i in b])
    _stable_rng("formats", seed, epoch).shuffle(batches)
    return batches
