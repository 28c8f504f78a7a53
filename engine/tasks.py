"""Tasks glue data to objectives for the trainer (see engine/trainer.py for the interface)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from engine.data import IGNORE, SFTData, pad_batch
from engine.errors import UserError
from engine.objectives import (
    head_cross_entropy,
    infonce_sum,
    labelled_rows,
    masked_mean_pool,
    mcc_kl_sum,
    pooled_ce_mi_sum,
    span_prediction_positions,
    to_device,
    token_cross_entropy,
)


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


class SFTTask:
    """Supervised training on teacher rationales: mean next-token cross-entropy over response tokens."""

    weights = {"ce": 1.0}

    def __init__(self, data: SFTData, device):
        self.data, self.device = data, device
        self.pad_id = data.tok.padding_id

    @property
    def num_examples(self) -> int:
        return len(self.data)

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


class MCCTask:
    """MCC-KD: cross-entropy on every rationale + alpha x symmetric KL between the answer-span
    predictions of each pair of rationales of the same question (engine.objectives.mcc_kd_sums)."""

    def __init__(self, data, device, alpha: float, temperature: float):
        self.check(alpha, temperature)
        self.data, self.device, self.temperature = data, device, temperature
        self.weights = {"ce": 1.0, "kl": alpha}
        self.pad_id = data.tok.padding_id

    @staticmethod
    def check(alpha: float, temperature: float, num_rationales: int = 2) -> None:
        if num_rationales < 2:
            raise UserError(f"--num_rationales must be >= 2, got {num_rationales}")
        if alpha < 0:
            raise UserError(f"--alpha must be >= 0, got {alpha}")
        if temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {temperature}")

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def lengths(self, epoch: int) -> List[int]:
        return [self.data.length(q, epoch) for q in self.data.keep]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        seqs, pairs = [], []
        for p in positions:
            q = self.data.keep[p]
            rows = []
            for j in self.data.choose(q, epoch):
                x, y, (s, e) = self.data.example(q, j)
                rows.append((len(seqs), span_prediction_positions(s, e)))
                seqs.append((x, y))
            pairs += [(ra, pa, rb, pb) for n, (ra, pa) in enumerate(rows) for rb, pb in rows[n + 1:]]
        inputs, labels = pad_batch(seqs, self.pad_id)
        return make_batch(inputs, labels, self.device, {"ce": int((labels != IGNORE).sum()), "kl": len(pairs)},
                          sum(len(x) for x, _ in seqs), {"pairs": pairs})

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        hidden = model.forward_hidden(batch.inputs)
        kl = mcc_kl_sum(lambda rows, pos: model.logits(hidden[rows, pos]), batch.extra["pairs"], self.temperature,
                        hidden.device)
        return {"ce": response_cross_entropy(model, hidden, batch.labels, batch.label_rows), "kl": kl}


MI_ESTIMATORS = ("pooled_ce", "critic")
CRITIC_TEMPERATURE = 0.1  # InfoNCE's cosine-similarity temperature (SimCLR's order of magnitude)


class MICritic(torch.nn.Module):
    """The learned variational critic of the `critic` MI estimator: one small projection head, shared by
    both tasks, mapping a pooled hidden state [*, dim] to [*, proj_dim] (compared by cosine similarity).
    Initialised from `seed` alone, so every rank starts with the same weights; kept in fp32."""

    def __init__(self, dim: int, seed: int, device, proj_dim: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, proj_dim))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                bound = layer.in_features ** -0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=g))
                layer.bias.zero_()
        self.to(device)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled.float())


def _response_positions(labels: torch.Tensor, device):
    """(rows [B, W], positions [B, W], mask [B, W]) of the positions whose next token is a response
    token (the positions the cross-entropy covers), each row padded with its last position; from
    host-side labels, so the training step waits for nothing."""
    keep = labels != IGNORE
    width = max(1, int(keep.sum(1).max()))
    rows, cols, mask = [], [], []
    for b in range(labels.shape[0]):
        pos = keep[b].nonzero().flatten().tolist() or [0]
        n = int(keep[b].sum())
        cols.append(pos + [pos[-1]] * (width - len(pos)))
        mask.append([True] * n + [False] * (width - n))
        rows.append([b] * width)
    return tuple(to_device(torch.tensor(x), device) for x in (rows, cols, mask))


class StepByStepTask:
    """Distilling step-by-step (Hsieh et al. 2023) on a decoder: the label task and the rationale task
    of each question over one model, loss alpha x CE(label) + (1 - alpha) x CE(rationale), each CE the
    mean over its own response tokens in the optimizer step; plus beta x the MI term (Chen et al. 2024)
    between the two tasks' passes of each question, averaged over questions:

      pooled_ce  engine.objectives.pooled_ce_mi_sum on the vocabulary-sharded logits of the response
                 positions (the label pass detached)
      critic     InfoNCE (engine.objectives.infonce_sum) between the MICritic projections of the
                 rationale pass's and the (detached) label pass's hidden states, mean-pooled over their
                 response positions; the other questions of the micro-batch are the negatives, so each
                 replica's micro-batch is its own pool of candidates

    A part whose weight is 0 is not computed at all (alpha 1: the label task only; beta 0: no MI
    term, no critic); a pass only the MI term needs runs without gradient where the term takes none."""

    def __init__(self, data, device, alpha: float, beta: float = 0.0, estimator: str = "pooled_ce",
                 hidden_dim: int = 0, seed: int = 0):
        self.check(alpha, beta, estimator)
        self.data, self.device, self.estimator = data, device, estimator
        self.weights = {name: w for name, w in (("label", alpha), ("rationale", 1.0 - alpha), ("mi", beta)) if w > 0}
        self.pad_id = data.tok.padding_id
        self.task_prefixes = dict(data.prefixes)  # recorded with every saved model, for infer.py
        self.critic = MICritic(hidden_dim, seed, device) if beta > 0 and estimator == "critic" else None

    @staticmethod
    def passes_for(alpha: float, beta: float) -> tuple:
        """The tasks a run must build: those with a loss weight, and both for the MI term."""
        if beta > 0:
            return ("label", "rationale")
        return tuple(name for name, w in (("label", alpha), ("rationale", 1.0 - alpha)) if w > 0)

    @staticmethod
    def check(alpha: float, beta: float, estimator: str) -> None:
        if not 0 <= alpha <= 1:
            raise UserError(f"--alpha must be in [0, 1] (the label task's weight), got {alpha}")
        if beta < 0:
            raise UserError(f"--beta must be >= 0 (0: no mutual-information term), got {beta}")
        if estimator not in MI_ESTIMATORS:
            raise UserError(f"--mi_estimator {estimator!r} is not one of {', '.join(MI_ESTIMATORS)}")

    def extra_modules(self):
        return [self.critic] if self.critic is not None else []

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def lengths(self, epoch: int) -> List[int]:
        return [self.data.length(i, epoch) for i in self.data.keep]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        indices = [self.data.keep[p] for p in positions]
        passes, counts, n_tokens = {}, {}, 0
        for name in self.data.passes:
            pairs = [self.data.example(name, i, epoch) for i in indices]
            inputs, labels = pad_batch(pairs, self.pad_id)
            pooled = "mi" in self.weights and self.estimator == "pooled_ce"
            passes[name] = make_batch(inputs, labels, self.device, {}, 0,
                                      {"positions": _response_positions(labels, self.device)} if pooled else None)
            counts[name] = int((labels != IGNORE).sum())
            n_tokens += sum(len(x) for x, _ in pairs)
        counts["mi"] = len(indices)
        first = passes[self.data.passes[0]]
        return Batch(first.inputs, first.labels, counts, n_tokens, {"passes": passes})

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        sums, hidden = {}, {}
        for name, one in batch.extra["passes"].items():
            trained = name in self.weights or (name == "rationale" and "mi" in self.weights)
            with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
                hidden[name] = model.forward_hidden(one.inputs)
            if name in self.weights:
                sums[name] = response_cross_entropy(model, hidden[name], one.labels, one.label_rows)
        if "mi" in self.weights:
            sums["mi"] = self._mi_sum(model, hidden, batch.extra["passes"])
        return sums

    def _mi_sum(self, model, hidden, passes) -> torch.Tensor:
        label_h, label_y = hidden["label"].detach(), passes["label"].labels
        rationale_h, rationale_y = hidden["rationale"], passes["rationale"].labels
        if self.estimator == "critic":
            anchors = self.critic(masked_mean_pool(rationale_h, rationale_y != IGNORE))
            candidates = self.critic(masked_mean_pool(label_h, label_y != IGNORE))
            return infonce_sum(anchors, candidates, CRITIC_TEMPERATURE)
        lr, lp, lm = passes["label"].extra["positions"]
        rr, rp, rm = passes["rationale"].extra["positions"]
        with torch.no_grad():
            label_logits = model.logits(label_h[lr, lp], gather=False)
        return pooled_ce_mi_sum(label_logits, lm, model.logits(rationale_h[rr, rp], gather=False), rm)


def group_by_format(task, record_groups) -> str:
    """Give the task one group per example (its records' data format, engine.data.format_groups):
    the trainer then forms every batch from one group and leaves out examples whose group is None.
    Returns a line saying so ("" when the records carry no formats)."""
    if record_groups is None:
        return ""
    task.groups = [record_groups[i] for i in task.data.keep]
    counts = {g: task.groups.count(g) for g in sorted(set(task.groups) - {None})}
    left_out = task.groups.count(None)
    return ("one data format per batch: " + ", ".join(f"{g} {n}" for g, n in counts.items())
            + (f" examples ({left_out} of other formats left out)" if left_out else " examples"))


class TeacherKLTask(SFTTask):
    """Distillation from the teacher's distributions: on every response token, the cross-entropy of
    the student's token (`ce`) and T^2 KL(teacher || student) at temperature T (`kl`), weighted
    (1 - w) and w. The teacher (engine/teacher.py) is a top-k file or a frozen checkpoint run here."""

    def __init__(self, data: SFTData, device, teacher, kl_weight: float, temperature: float):
        super().__init__(data, device)
        self.teacher, self.temperature = teacher, temperature
        self.weights = {"ce": 1.0 - kl_weight, "kl": kl_weight}

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        from engine.teacher import kl_rows

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
        from engine.objectives import head_teacher_kl, logits_teacher_kl

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
