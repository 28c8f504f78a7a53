"""Supervised distillation on teacher rationales: the data, the task and the flags of `train.py` (objective sft)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List

import torch

from engine.runtime.errors import DataError
from engine.text.prompts import format_prompt
from engine.text.records import validate_training_records
from engine.text.sequences import IGNORE, pad_batch, stable_rng
from engine.train.args import TrainArgs
from engine.train.task import Batch, RecordsTask, make_batch, response_cross_entropy


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
        return stable_rng(self.seed, epoch, index).randrange(len(out))

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


class SFTTask(RecordsTask):
    """Supervised training on teacher rationales: mean next-token cross-entropy over response tokens."""

    weights = {"ce": 1.0}

    def __init__(self, data: SFTData, device):
        self.data, self.device = data, device
        self.pad_id = data.tok.padding_id

    def lengths(self, epoch: int) -> List[int]:
        return [min(self.data.full_length(i, epoch), self.data.max_seq_len) for i in self.data.keep]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        pairs = [self.data.example(self.data.keep[p], epoch) for p in positions]
        inputs, labels = pad_batch(pairs, self.pad_id)
        return make_batch(inputs, labels, self.device, {"ce": int((labels != IGNORE).sum())},
                          sum(len(x) for x, _ in pairs))

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        hidden = model.forward_hidden(batch.inputs)
        return {"ce": response_cross_entropy(model, hidden, batch.labels, batch.label_rows)}


@dataclass(kw_only=True)
class SFTArgs(TrainArgs):
    """supervised training on teacher rationales."""

    OBJECTIVE: ClassVar[str] = "sft"

    def make_task(self, records, tokenizer, max_len: int, info):
        data = SFTData(records, tokenizer, max_len, self.template, self.seed, self.train_file)
        if info.is_main:
            print(f"{self.train_file}: {data.describe()}", flush=True)
        return SFTTask(data, info.device)
