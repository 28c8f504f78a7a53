"""The teacher-distribution task: cross-entropy and T^2 KL(teacher || student) (or another --divergence) on
the response tokens, mixed on every batch (ours) or chosen by the batch's data format (the authors', --kl_formats)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from engine.distill.sft import SFTData, SFTTask
from engine.runtime.distributed import to_device
from engine.text.sequences import pad_batch
from engine.train.task import Batch, response_cross_entropy


class TeacherKLTask(SFTTask):
    """Distillation from the teacher's distributions. Per response token: the cross-entropy of the
    student's token (`ce`) and T^2 KL(teacher || student) at temperature T (`kl`; --divergence
    reverse_kl or jsd puts that divergence there instead: models/vocab_parallel.divergence_chunks).

      mixture (default, ours)   every batch: (1 - w) ce + w kl
      kl_formats (the authors)  a batch of one of these formats: kl alone; any other batch: ce alone
                                (FlanT5-CoT-Specialization train_distill_simple.py:87-91, loss_type
                                match_distribution; their default match_sample is --objective sft)
    Reduction: step_token_mean (ours) normalises by the response tokens of the whole optimizer step
    (the trainer sums counts over micro-batches and replicas, so any split gives the same step);
    micro_batch_mean (the authors', train_distill_simple.py:37,52,104) makes each micro-batch's loss
    its own token mean and the step the mean over micro-batches (count 1 each), so a micro-batch of
    short answers weighs as much as one of long chains of thought. Under either, both parts share one
    count, so `loss_ce` + `loss_kl` (weighted) is the loss. The teacher (teachers.py) is a top-k file
    or a frozen checkpoint run here."""

    def __init__(self, data: SFTData, device, teacher, kl_weight: float, temperature: float,
                 kl_formats: Optional[Sequence[str]] = None, reduction: str = "step_token_mean",
                 divergence: Tuple[str, float] = ("forward_kl", 0.5)):
        super().__init__(data, device)
        self.teacher, self.temperature = teacher, temperature
        self.divergence, self.jsd_beta = divergence  # the `kl` part's divergence (--divergence, --jsd_beta)
        self.kl_formats = frozenset(kl_formats) if kl_formats else None
        self.micro_batch_mean = reduction == "micro_batch_mean"
        self.weights = {"ce": 1.0, "kl": 1.0} if self.kl_formats else {"ce": 1.0 - kl_weight, "kl": kl_weight}

    def parts(self, positions: List[int]) -> tuple:
        """The loss parts a batch trains: both, or by its data format (one format per batch) one alone."""
        if self.kl_formats is None:
            return ("ce", "kl")
        return ("kl",) if self.groups[positions[0]] in self.kl_formats else ("ce",)

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        from engine.distill.teacher_kl.teachers import kl_rows

        parts = self.parts(positions)
        items = [(self.data.keep[p], self.data.choice(self.data.keep[p], epoch)) for p in positions]
        pairs = [self.data.example(i, epoch, w) for i, w in items]
        inputs, labels = pad_batch(pairs, self.pad_id)
        rows, own, counts = kl_rows(labels)
        label_rows = to_device(torch.tensor(rows, dtype=torch.long), self.device)  # the KL's rows too
        extra = {"own": to_device(torch.tensor(own, dtype=torch.long), self.device), "parts": parts,
                 "n_labelled": len(rows)}
        if "kl" in parts:
            extra.update(self.teacher.batch_extra(items, counts, self.device))
        n = 1 if self.micro_batch_mean else len(rows)
        return Batch(to_device(inputs, self.device), to_device(labels, self.device), {"ce": n, "kl": n},
                     sum(len(x) for x, _ in pairs), extra, label_rows)

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        from models.vocab_parallel import head_divergence, logits_divergence

        parts = batch.extra["parts"]
        # first: an online teacher's forward holds no student activations
        target = self.teacher.target(batch) if "kl" in parts else None
        hidden = model.forward_hidden(batch.inputs)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        out = {"ce": zero, "kl": zero}
        if "ce" in parts:
            out["ce"] = response_cross_entropy(model, hidden, batch.labels, batch.label_rows)
        if "kl" in parts:
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.label_rows)
            head = model.head_matrix()
            how = (self.temperature, self.divergence, self.jsd_beta)
            if head is None:
                out["kl"] = logits_divergence(model.logits(h, gather=False), target, *how)
            else:
                out["kl"] = head_divergence(h, head, target, *how)
        if self.micro_batch_mean:  # this micro-batch's token mean (its count is 1)
            n = max(1, batch.extra["n_labelled"])
            out = {k: v / n for k, v in out.items()}
        return out
