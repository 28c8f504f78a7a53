"""The teacher-distribution task: cross-entropy and T^2 KL(teacher || student) on every response token."""
from __future__ import annotations

from typing import Dict, List

import torch

from engine.distill.sft import SFTData, SFTTask
from engine.runtime.distributed import to_device
from engine.text.sequences import pad_batch
from engine.train.task import Batch, response_cross_entropy


class TeacherKLTask(SFTTask):
    """Distillation from the teacher's distributions: on every response token, the cross-entropy of
    the student's token (`ce`) and T^2 KL(teacher || student) at temperature T (`kl`), weighted
    (1 - w) and w. The teacher (engine/teacher.py) is a top-k file or a frozen checkpoint run here."""

    def __init__(self, data: SFTData, device, teacher, kl_weight: float, temperature: float):
        super().__init__(data, device)
        self.teacher, self.temperature = teacher, temperature
        self.weights = {"ce": 1.0 - kl_weight, "kl": kl_weight}

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        from engine.distill.teacher_kl.teachers import kl_rows

        items = [(self.data.keep[p], self.data.choice(self.data.keep[p], epoch)) for p in positions]
        pairs = [self.data.example(i, epoch, w) for i, w in items]
        inputs, labels = pad_batch(pairs, self.pad_id)
        rows, own, counts = kl_rows(labels)
        label_rows = to_device(torch.tensor(rows, dtype=torch.long), self.device)  # the KL's rows too
        extra = {"own": to_device(torch.tensor(own, dtype=torch.long), self.device),
                 **self.teacher.batch_extra(items, counts, self.device)}
        return Batch(to_device(inputs, self.device), to_device(labels, self.device),
                     {"ce": len(rows), "kl": len(rows)}, sum(len(x) for x, _ in pairs), extra, label_rows)

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        from models.vocab_parallel import head_teacher_kl, logits_teacher_kl

        target = self.teacher.target(batch)  # first: an online teacher's forward holds no student activations
        hidden = model.forward_hidden(batch.inputs)
        ce = response_cross_entropy(model, hidden, batch.labels, batch.label_rows)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.label_rows)
        head = model.head_matrix()
        if head is None:
            kl = logits_teacher_kl(model.logits(h, gather=False), target, self.temperature)
        else:
            kl = head_teacher_kl(h, head, target, self.temperature)
        return {"ce": ce, "kl": kl}
