"""Tasks glue data to objectives for the trainer: the Task base class (the interface the trainer of
engine/train/trainer.py uses, with its defaults), the Batch it passes around, and helpers every
objective shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from engine.runtime.distributed import to_device
from models.vocab_parallel import head_cross_entropy, labelled_rows, token_cross_entropy


def response_cross_entropy(model, hidden: torch.Tensor, labels: torch.Tensor,
                           rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Summed next-token CE of the labelled positions: chunk by chunk from the hidden states of those
    positions only (no full logits), or from the logits when the head is not one matrix (LoRA
    dropout on the head)."""
    head = model.head_matrix()
    if head is None:
        return token_cross_entropy(model.logits(hidden, gather=False), labels)
    return head_cross_entropy(hidden, head, labels, rows=rows)


def make_batch(inputs: torch.Tensor, labels: torch.Tensor, device, counts: Dict[str, float], n_tokens: int,
               extra: Optional[dict] = None) -> "Batch":
    """A batch on the device, with the labelled positions found on the host."""
    return Batch(to_device(inputs, device), to_device(labels, device), counts, n_tokens, extra or {},
                 to_device(labelled_rows(labels), device))


@dataclass
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    counts: Dict[str, float]
    n_tokens: int
    extra: dict = field(default_factory=dict)
    label_rows: Optional[torch.Tensor] = None  # flat indices of the labelled positions (None: all)


class Task:
    """What the trainer asks of an objective; every objective's task subclasses it. The interface, as
    the trainer uses it, is listed in engine/train/trainer.py: a subclass gives `weights`,
    `num_examples`, `lengths`, `micro_batch` and `loss_sums`; the rest has defaults here (no extra
    modules, no groups, no task prefixes, no files of its own)."""

    weights: Dict[str, float]
    groups: Optional[List[Optional[str]]] = None
    task_prefixes: Optional[Dict[str, str]] = None

    @property
    def num_examples(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not say how many examples it has")

    def lengths(self, epoch: int) -> List[int]:
        raise NotImplementedError(f"{type(self).__name__} does not give its example lengths")

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        raise NotImplementedError(f"{type(self).__name__} builds no batches")

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} computes no loss")

    def start_step(self, model, step: int) -> None:
        """Called before the micro-batches of optimizer step `step` (1-based, the number its metrics line
        carries) are built, with the model being trained: an objective that samples from the live
        weights (on_policy) takes them here. Default: nothing."""

    def step_metrics(self) -> Dict[str, object]:
        """The objective's own numbers for the metrics line of the step just taken (floats or device
        tensors, read back when the line is written). Default: none."""
        return {}

    def extra_modules(self) -> List[torch.nn.Module]:
        return []

    def parallel_models(self) -> List[Tuple[torch.nn.Module, object]]:
        return []

    def write_files(self, directory: str) -> None:
        return None

    def example_records(self) -> List[int]:
        """The training record each example is made from (default: example i is record i)."""
        return list(range(self.num_examples))

    def group_by(self, record_groups: Sequence[Optional[str]]) -> None:
        """Form every batch from one group: record_groups[r] is the group of training record r (its
        data format; None: left out), and each example takes its record's."""
        self.groups = [record_groups[r] for r in self.example_records()]


class RecordsTask(Task):
    """A task whose examples are its data's kept training records (`self.data`: len() and `keep`)."""

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def example_records(self) -> List[int]:
        return self.data.keep
