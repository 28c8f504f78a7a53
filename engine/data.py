"""Data readers, the prompt template shared by every launcher, and collators."""
from __future__ import annotations

import json
import os
from typing import List, Sequence

from engine.errors import UserError

PROMPT_TEMPLATES = {
    "default": "### Instruction:\n{instruction}\n\n### Response:\n",
    "none": "{instruction}",
}


class DataError(UserError):
    pass


def format_prompt(instruction: str, template: str = "default") -> str:
    if template not in PROMPT_TEMPLATES:
        raise DataError(f"--template {template!r} is unknown; choose one of {', '.join(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template].format(instruction=instruction)


def read_records(path: str, required: Sequence[str] = ("instruction",)) -> List[dict]:
    """A JSON list of objects or JSON lines; every record must hold the `required` string keys."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
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
    return records


# ----------------------------------------------------------------------------------------------
# Supervised examples: prompt (no loss) + response (loss) token ids
# ----------------------------------------------------------------------------------------------
IGNORE = -100


def _stable_rng(*parts):
    import random
    import zlib

    return random.Random(zlib.crc32(repr(parts).encode()))


def validate_training_records(records: List[dict], path: str, need_label: bool = False) -> None:
    for i, rec in enumerate(records):
        out = rec.get("output")
        if out is None:
            raise DataError(f"{path} record {i} lacks the key 'output'")
        if isinstance(out, list):
            if not out or not all(isinstance(o, str) for o in out):
                raise DataError(f"{path} record {i}: 'output' must be a string or a non-empty list of strings")
        elif not isinstance(out, str):
            raise DataError(f"{path} record {i}: 'output' must be a string or a list of strings, "
                            f"not {type(out).__name__}")
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
    import torch

    width = max(len(x) for x, _ in pairs)
    inputs = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for b, (x, y) in enumerate(pairs):
        inputs[b, : len(x)] = torch.tensor(x)
        labels[b, : len(y)] = torch.tensor(y)
    return inputs, labels
