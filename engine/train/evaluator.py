"""What scores a model on --label_file during training: the Evaluator interface the trainer uses, and
greedy generation with task accuracy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist

from engine.infer.generation import SamplingParams, complete_prompts
from engine.infer.metrics import Accuracy, accuracy_of, check_report
from engine.infer.prompting import encode_prompt, prompt_room
from engine.runtime import distributed
from engine.text.answers import check_scoring, check_task, choices_in, extract_answer, is_correct


class Evaluator:
    """What the trainer asks of an evaluator: called on the model (in eval mode, on every rank) it
    returns its results, one evaluation line of metrics.jsonl; `metric` names the result that keeps
    best/, `higher_is_better` which way (the implicit emulator's state error: lower), rank(result)
    the key best/ is kept by (higher is better; later entries break ties of earlier ones), and
    summary(result) the words the trainer prints after "[step N] eval "."""

    metric = "accuracy"
    higher_is_better = True

    def __call__(self, model) -> dict:
        raise NotImplementedError(f"{type(self).__name__} scores nothing")

    def samples(self) -> List[dict]:
        """A few records as the last call answered them (index, instruction, output, prediction, label,
        correct): what the trainer writes to samples.jsonl and the loggers. None by default."""
        return []

    def rank(self, result: dict) -> tuple:
        value = result[self.metric]
        return (value if self.higher_is_better else -value,)

    def summary(self, result: dict) -> str:
        text = (
            f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']}, "
            f"unparsable {result['unparsable']})"
        )
        if "accuracy_answered" in result:
            text += f", accuracy of the answered {result['accuracy_answered']:.4f} ({result['answered']} answered)"
        return text


@dataclass(frozen=True)
class Decoding:
    """How an evaluator decodes and scores: the task's answers, sequences decoded together, the
    generation budget, the prompt template, `scoring` (ours, exact or mcc: engine/text/answers.py)
    and `report` (ours, or authors: the answered-only accuracy beside)."""

    task: str
    batch_size: int = 64
    max_new_tokens: int = 256
    template: str = "default"
    scoring: str = "ours"
    report: str = "ours"
    samples: int = 0  # records whose generations samples() gives

    @classmethod
    def of(cls, args) -> "Decoding":
        """The decoding the training flags ask for (--task, --eval_batch_size, --max_new_tokens, ...)."""
        return cls(args.task, args.eval_batch_size, args.max_new_tokens, args.template, args.scoring, args.report,
                   getattr(args, "eval_samples", 0))


class GenerationEvaluator(Evaluator):
    """Greedy generation on labelled records and task accuracy, decoded and scored as `decoding`
    says. Data-parallel replicas take interleaved slices; counts are summed over them."""

    def __init__(self, records, tokenizer, info, decoding: Decoding):
        self.task, self.tok, self.info = check_task(decoding.task), tokenizer, info
        self.scoring, self.report = check_scoring(decoding.scoring), check_report(decoding.report)
        self.batch_size, self.max_new_tokens, self.template = (decoding.batch_size, decoding.max_new_tokens,
                                                               decoding.template)
        self.n_samples, self._last_texts = decoding.samples, []
        mine = records[info.dp_rank::info.dp_size]
        self.labels = [r.get("label") for r in mine]
        self.instructions = [r["instruction"] for r in mine]
        self.choices = [choices_in(r["instruction"]) for r in mine]  # CSQA answers and labels may be choice texts
        self._prompts: Dict[int, List[List[int]]] = {}  # room -> encoded prompts, encoded once

    def prompts(self, max_seq_len: int) -> List[List[int]]:
        """The prompts, encoded once; long ones lose their beginning."""
        room = prompt_room(max_seq_len, self.max_new_tokens)
        if room not in self._prompts:
            self._prompts[room] = [encode_prompt(self.tok, ins, self.template, room).ids for ins in self.instructions]
        return self._prompts[room]

    def texts(self, model) -> List[str]:
        params = SamplingParams(max_new_tokens=self.max_new_tokens, vocab_size=self.tok.vocab_size)
        stop = [self.tok.eos_id] if self.tok.eos_id is not None else []
        new = complete_prompts(model, self.prompts(model.args.max_seq_len), params, stop, batch_size=self.batch_size)
        return [self.tok.decode([t for t in ids if t not in stop]) for ids in new]

    def samples(self) -> List[dict]:
        """The first `Decoding.samples` records of this replica's share, as the last evaluation answered."""
        out = []
        for i, text in enumerate(self._last_texts[: self.n_samples]):
            pred = extract_answer(text, self.task, self.scoring, self.choices[i])
            out.append({"index": i * self.info.dp_size + self.info.dp_rank, "instruction": self.instructions[i],
                        "output": text, "prediction": pred, "label": self.labels[i],
                        "correct": is_correct(pred, self.labels[i], self.task, self.scoring, self.choices[i])})
        return out

    def __call__(self, model) -> dict:
        self._last_texts = self.texts(model)
        acc = accuracy_of(self._last_texts, self.labels, self.task, self.scoring, self.choices)
        counts = torch.tensor(
            [acc.correct, acc.total, acc.unparsable, acc.unparsable_labels],
            dtype=torch.float64,
            device=model.head_weight.device,
        )
        if dist.is_initialized() and self.info.dp_size > 1:
            dist.all_reduce(counts, group=distributed.dp_group())
        c, t, u, b = (int(x) for x in counts.tolist())
        return Accuracy(correct=c, total=t, unparsable=u, unparsable_labels=b).as_dict(self.report)
