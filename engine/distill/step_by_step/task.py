"""The distilling step-by-step task: label and rationale passes of each question, optionally the MI term."""
from __future__ import annotations

from typing import Dict, List

import torch

from engine.distill.step_by_step.mi import (
    CRITIC_TEMPERATURE,
    MI_ESTIMATORS,
    MICritic,
    authors_mi_sum,
    infonce_sum,
    masked_mean_pool,
    mi_estimator_name,
    pooled_distribution_ce_sum,
    response_positions,
    response_window,
    widen,
    window_width,
)
from engine.runtime.errors import UserError
from engine.text.sequences import IGNORE, pad_batch
from engine.train.task import Batch, RecordsTask, make_batch, response_cross_entropy


class StepByStepTask(RecordsTask):
    """Distilling step-by-step (Hsieh et al. 2023) on a decoder: the label task and the rationale task
    of each question over one model, loss alpha x CE(label) + (1 - alpha) x CE(rationale), each CE the
    mean over its own response tokens in the optimizer step; plus beta x the MI term (Chen et al. 2024)
    between the two tasks' passes of each question, averaged over questions:

      authors                 the authors' term (mi.authors_mi_sum) on the vocabulary-sharded logits of
                              each pass's response window, its padding included (mask_padding: not)
      pooled_distribution_ce  ours (alias pooled_ce): mi.pooled_distribution_ce_sum on the sharded
                              logits of the real response positions (the label pass detached)
      critic                  ours: InfoNCE (mi.infonce_sum) between the MICritic projections of the
                              rationale pass's and the (detached) label pass's hidden states,
                              mean-pooled over their response positions; the other questions of the
                              micro-batch are the negatives, so each replica's micro-batch is its own
                              pool of candidates

    A part whose weight is 0 is not computed at all (alpha 1: the label task only; beta 0: no MI
    term, no critic); a pass only the MI term needs runs without gradient where the term takes none."""

    def __init__(
        self,
        data,
        device,
        alpha: float,
        beta: float = 0.0,
        estimator: str = "pooled_distribution_ce",
        hidden_dim: int = 0,
        seed: int = 0,
        mask_padding: bool = False,
    ):
        self.check(alpha, beta, estimator)
        estimator = mi_estimator_name(estimator)
        self.data, self.device, self.estimator, self.mask_padding = data, device, estimator, mask_padding
        self.weights = {name: w for name, w in (("label", alpha), ("rationale", 1.0 - alpha), ("mi", beta)) if w > 0}
        self.pad_id = data.tok.padding_id
        # recorded with every saved model, for infer.py (none for the authors' standard model: no prefixes)
        self.task_prefixes = dict(data.prefixes) if any(data.prefixes.values()) else None
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
        if mi_estimator_name(estimator) not in MI_ESTIMATORS:
            raise UserError(
                f"--mi_estimator {estimator!r} is not one of {', '.join(MI_ESTIMATORS)} (pooled_ce: the "
                f"former name of pooled_distribution_ce)"
            )

    def extra_modules(self):
        return [self.critic] if self.critic is not None else []

    def lengths(self, epoch: int) -> List[int]:
        return [self.data.length(i, epoch) for i in self.data.keep]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        indices = [self.data.keep[p] for p in positions]
        passes, counts, n_tokens = {}, {}, 0
        for name in self.data.passes:
            pairs = [self.data.example(name, i, epoch) for i in indices]
            inputs, labels = pad_batch(pairs, self.pad_id)
            extra = None
            if "mi" in self.weights and self.estimator == "authors":
                inputs, labels = widen(inputs, labels, window_width(labels), self.pad_id)
                extra = {"positions": response_window(labels, self.device)}
            elif "mi" in self.weights and self.estimator == "pooled_distribution_ce":
                extra = {"positions": response_positions(labels, self.device)}
            passes[name] = make_batch(inputs, labels, self.device, {}, 0, extra)
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
        rationale_logits = model.logits(rationale_h[rr, rp], gather=False)
        if self.estimator == "pooled_distribution_ce":
            return pooled_distribution_ce_sum(label_logits, lm, rationale_logits, rm)
        if self.mask_padding:
            return authors_mi_sum(label_logits, rationale_logits, lm, rm)
        return authors_mi_sum(label_logits, rationale_logits)
