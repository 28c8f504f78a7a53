"""The flags of train_mcc.py (MCC-KD)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.runtime.cli import flag
from engine.train.args import TrainArgs


@dataclass(kw_only=True)
class MCCArgs(TrainArgs):
    """MCC-KD: cross-entropy on several rationales per question plus the consistency of their answer spans."""

    OBJECTIVE: ClassVar[str] = "mcc"
    LAUNCHER: ClassVar[str] = "train_mcc.py"
    SUMMARY: ClassVar[str] = ("Train a student with MCC-KD: cross-entropy on several rationales per question plus "
                              "the consistency of their answer-span predictions.")

    alpha: float = flag("weight of the consistency (symmetric KL) term.", 0.01)
    temperature: float = flag("softening temperature T of the answer-span distributions.", 1.0)
    num_rationales: int = flag("rationales per question per step (>= 2); every pair among them is compared.", 2)
    recompute_spans: bool = flag("ignore the file's indices and find the answer spans anew.", False)
    span_logits: str = flag(
        "logits the consistency term compares: ours (the predictions OF the answer-span tokens) or authors "
        "(the logits AT the span positions, one token late, as the MCC-KD code slices them).",
        "ours",
    )
    ce_reduction: str = flag(
        "cross-entropy: token (the mean over the step's response tokens) or sequence (the mean over "
        "rationales of each one's token mean, the MCC-KD code's).",
        "token",
    )
    keep_wrong_rationales: bool = flag(
        "also train on rationales whose answer differs from the label (dropped by default).", False
    )

    def __post_init__(self):
        from engine.distill.mcc.task import MCCTask

        super().__post_init__()
        MCCTask.check(self.alpha, self.temperature, self.num_rationales, self.span_logits, self.ce_reduction)

    def make_task(self, records, tokenizer, max_len: int, info):
        from engine.distill.mcc.data import MultiRationaleData
        from engine.distill.mcc.task import MCCTask

        data = MultiRationaleData(records, tokenizer, max_len, self.template, self.seed, self.train_file,
                                  self.num_rationales, not self.recompute_spans, self.task,
                                  self.keep_wrong_rationales)
        if info.is_main:
            print(f"{self.train_file}: {data.describe()}", flush=True)
        return MCCTask(data, info.device, self.alpha, self.temperature, self.span_logits, self.ce_reduction)
