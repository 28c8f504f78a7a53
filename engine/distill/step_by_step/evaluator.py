"""Evaluation of a step-by-step model: the label task's accuracy, optionally the rationale task's."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from engine.infer.metrics import (
    accuracy_of,
    bleu_from_statistics,
    bleu_statistics,
    references_of,
    sentence_bleu,
)
from engine.runtime import distributed
from engine.train.evaluator import Decoding, Evaluator, GenerationEvaluator


class StepByStepEvaluator(Evaluator):
    """Evaluation of a distilling step-by-step model: greedy decoding of the LABEL task (its answer is
    the accuracy, and picks best/; `scoring` and `report` as GenerationEvaluator's); with
    `rationale_task`, the rationale task too (scored ours whatever `scoring`: a rationale never
    equals its label string): the answer its rationales state (rationale_accuracy,
    rationale_unparsable) and their BLEU against the records' 'output', when the records carry
    teacher rationales: corpus BLEU 0-100 (bleu "corpus": rationale_bleu) or the authors' mean of
    per-record unsmoothed BLEU 0-1 (bleu "sentence_mean": rationale_sentence_bleu)."""

    def __init__(self, records, tokenizer, info, decoding: Decoding, rationale_task: bool = False,
                 bleu: str = "corpus", prefixes: dict = None):
        from engine.text.prompts import task_instruction

        def prefixed(name):  # the task prefixes the model is trained with (the authors' predict: / explain:)
            return [{**r, "instruction": task_instruction(r["instruction"], name, prefixes)} for r in records]

        self.info, self.bleu = info, bleu
        self.label = GenerationEvaluator(prefixed("label"), tokenizer, info, decoding)
        plain = replace(decoding, scoring="ours", report="ours")  # rationales are scored ours
        self.rationale = GenerationEvaluator(prefixed("rationale"), tokenizer, info, plain) if rationale_task else None
        mine = records[info.dp_rank :: info.dp_size]
        self.references = [references_of(r) for r in mine]
        # over every record, not this replica's share: the replicas must all-reduce the same statistics
        self.with_bleu = rationale_task and any(references_of(r) for r in records)

    def samples(self) -> list:
        return self.label.samples()  # the label task's answers

    def __call__(self, model) -> dict:
        result = self.label(model)
        if self.rationale is None:
            return result
        texts = self.rationale.texts(model)
        acc = accuracy_of(texts, self.rationale.labels, self.rationale.task, choices=self.rationale.choices)
        stats = [acc.correct, acc.total, acc.unparsable]
        if self.with_bleu:
            pairs = [(t, refs) for t, refs in zip(texts, self.references) if refs]
            if self.bleu == "sentence_mean":  # additive over replicas: the sum of scores and their count
                stats += [sum(sentence_bleu(t, refs) for t, refs in pairs), len(pairs)]
            else:
                stats += bleu_statistics([t for t, _ in pairs], [refs for _, refs in pairs])
        totals = torch.tensor(stats, dtype=torch.float64, device=model.head_weight.device)
        if dist.is_initialized() and self.info.dp_size > 1:
            dist.all_reduce(totals, group=distributed.dp_group())
        totals = [float(x) for x in totals.tolist()]
        result.update(
            rationale_accuracy=totals[0] / max(totals[1], 1.0),
            rationale_correct=int(totals[0]),
            rationale_unparsable=int(totals[2]),
        )
        if self.with_bleu and self.bleu == "sentence_mean":
            result["rationale_sentence_bleu"] = totals[3] / max(totals[4], 1.0)
        elif self.with_bleu:
            result["rationale_bleu"] = bleu_from_statistics(totals[3:])["bleu"]
        return result
