"""What scores a model on --label_file during training: the Evaluator interface the trainer uses, and
greedy generation with task accuracy."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from engine.infer.generation import SamplingParams, complete_prompts
from engine.infer.metrics import Accuracy, accuracy_of
from engine.infer.prompting import encode_prompt, prompt_room
from engine.runtime import distributed
from engine.text.answers import check_task


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

    def rank(self, result: dict) -> tuple:
        value = result[self.metric]
        return (value if self.higher_is_better else -value,)

    def summary(self, result: dict) -> str:
        return (
            f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']}, "
            f"unparsable {result['unparsable']})"
        )


class GenerationEvaluator(Evaluator):
    """Greedy generation on labelled records and task accuracy. Data-parallel replicas take
    interleaved slices; counts are summed over them."""

    def __init__(
        self,
        records,
        tokenizer,
        task: str,
        info,
        batch_size: int = 64,
        max_new_tokens: int = 256,
        template: str = "default",
    ):
        self.task, self.tok, self.info = check_task(task), tokenizer, info
        self.batch_size, self.max_new_tokens, self.template = batch_size, max_new_tokens, template
        mine = records[info.dp_rank :: info.dp_size]
        self.labels = [r.get("label") for r in mine]
        self.instructions = [r["instruction"] for r in mine]
        self._prompts: Dict[int, List[List[int]]] = {}  # room -> encoded prompts, encoded once

    def prompts(self, max_seq_len: int) -> List[List[int]]:
        """The prompts, encoded once; long ones lose their beginning."""
        room = prompt_room(max_seq_len, self.max_new_tokens)
        if room not in self._prompts:
            self._prompts[room] = [encode_prompt(self.tok, ins, self.template, room).ids for ins in self.instructions]
        return self._prompts[room]

    def texts(self, model) -> List[str]:
        params = SamplingParams(max_new_tokens=self.max_new_tokens)
        stop = [self.tok.eos_id] if self.tok.eos_id is not None else []
        new = complete_prompts(model, self.prompts(model.args.max_seq_len), params, stop, batch_size=self.batch_size)
        return [self.tok.decode([t for t in ids if t not in stop]) for ids in new]

    def __call__(self, model) -> dict:
        acc = accuracy_of(self.texts(model), self.labels, self.task)
        counts = torch.tensor(
            [acc.correct, acc.total, acc.unparsable, acc.unparsable_labels],
            dtype=torch.float64,
            device=model.head_weight.device,
        )
        if dist.is_initialized() and self.info.dp_size > 1:
            dist.all_reduce(counts, group=distributed.dp_group())
        c, t, u, b = (int(x) for x in counts.tolist())
        return Accuracy(correct=c, total=t, unparsable=u, unparsable_labels=b).as_dict()
