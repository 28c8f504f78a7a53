"""Answering held-out lines: greedy decoding with a KV cache for every stage (the explicit-CoT
teacher writes `cot EOS answer EOS`; the no-CoT baseline and the students write `answer EOS`, the
students with their states injected during the prefill), exact-match accuracy, and the emulator's
state error. Explicit and implicit decoding run this same loop, so their examples/s compare.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from engine.distill.implicit.data import CoTExamples, Encoded, padded, same_answer
from engine.distill.implicit.states import inject_hook
from engine.infer.metrics import Accuracy
from engine.runtime import distributed
from engine.train.evaluator import Evaluator

SYNC_EVERY = 8  # decode steps between checks (on the host) whether every row has finished


def _best(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The greedy choice among the ids the tokenizer has (all, when vocab_size is 0)."""
    return (logits[:, :vocab_size] if 0 < vocab_size < logits.shape[-1] else logits).argmax(-1)


@torch.no_grad()
def greedy_decode(model, prompts: Sequence[Sequence[int]], eos: int, n_eos: int, max_new_tokens: int,
                  states: Optional[torch.Tensor] = None, vocab_size: int = 0) -> List[List[int]]:
    """New tokens of each prompt, greedy, up to and including its n_eos-th EOS (or max_new_tokens).
    states [B, n_layers, dim]: injected before each layer at each prompt's last position (prefill).
    vocab_size: the tokenizer's; ids at or above it (a padded vocabulary's rows) are never chosen."""
    fit = [i for i, p in enumerate(prompts) if len(p) < model.args.max_seq_len]
    if len(fit) < len(prompts):  # a line with no room to answer is answered with nothing: it counts wrong
        some = states[fit] if states is not None else None
        got = (
            dict(zip(fit, greedy_decode(model, [prompts[i] for i in fit], eos, n_eos, max_new_tokens, some,
                                        vocab_size)))
            if fit
            else {}
        )
        return [got.get(i, []) for i in range(len(prompts))]
    device = model.head_weight.device
    lens = [len(p) for p in prompts]
    width = max(lens)
    budget = min(max_new_tokens, model.args.max_seq_len - width)
    rows = torch.arange(len(prompts), device=device)
    last = torch.tensor(lens, device=device) - 1
    cache = model.new_cache(len(prompts), width + budget)
    hook = inject_hook(states, rows, last) if states is not None else None
    hidden = model.forward_hidden(padded(prompts, eos).to(device), cache=cache, cache_rows=rows, layer_hook=hook)
    token = _best(model.logits(hidden[rows, last]), vocab_size)
    out = torch.empty(len(prompts), budget, dtype=torch.long, device=device)
    seen = torch.zeros(len(prompts), dtype=torch.long, device=device)
    pos = last + 1
    for step in range(budget):
        out[:, step] = token
        seen += token == eos
        if step + 1 == budget or ((step + 1) % SYNC_EVERY == 0 and bool((seen >= n_eos).all())):
            break
        # rows decode from their own positions; the host knows the longest without asking
        token = _best(model(token[:, None], positions=pos[:, None], cache=cache, kv_len=width + step + 1)[:, -1],
                      vocab_size)
        pos = pos + 1
    result = []
    for ids in out[:, :step + 1].tolist():
        ends = [i for i, t in enumerate(ids) if t == eos]
        result.append(ids[:ends[n_eos - 1] + 1] if len(ends) >= n_eos else ids)
    return result


def answer_of(new_tokens: List[int], eos: int, cot: bool, tok) -> Optional[str]:
    """The answer text in decoded tokens: between the first and second EOS after a CoT, before the
    first EOS without one; None when the output stops before that or holds ids the tokenizer lacks."""
    ends = [i for i, t in enumerate(new_tokens) if t == eos]
    need = 2 if cot else 1
    if len(ends) < need:
        return None
    start = ends[0] + 1 if cot else 0
    answer = new_tokens[start:ends[need - 1]]
    if any(t >= tok.vocab_size for t in answer):  # a padding row of the embedding: no text at all
        return None
    return tok.decode(answer)


def output_text(new_tokens: List[int], eos: int, tok) -> str:
    """Decoded tokens as the data file writes them: the pieces between EOS joined by ` #### ` (a
    teacher's `cot #### answer`, a student's `answer`); padding rows of the embedding left out."""
    pieces, piece = [], []
    for t in new_tokens + [eos]:
        if t == eos:
            pieces.append(tok.decode(piece))
            piece = []
        elif t < tok.vocab_size:
            piece.append(t)
    if new_tokens and new_tokens[-1] == eos:
        pieces.pop()  # the EOS ending the output starts no piece
    return " #### ".join(p.strip() for p in pieces)


# (model, line positions) -> (output text, answer or None) per position
AnswerFn = Callable[[object, List[int]], List[Tuple[str, Optional[str]]]]


def explicit_answers(examples: CoTExamples, view: str, tok, cot: bool, max_new_tokens: int) -> AnswerFn:
    """The teacher (cot=True) or the no-CoT baseline: decode from `BOS x EOS`."""
    eos = examples.eos[view]

    def answer(model, positions):
        encs = [examples.get(view, p) for p in positions]
        outs = greedy_decode(model, [e.prompt(eos) for e in encs], eos, 2 if cot else 1, max_new_tokens,
                             vocab_size=tok.vocab_size)
        return [(output_text(o, eos, tok), answer_of(o, eos, cot, tok)) for o in outs]

    return answer


def implicit_answers(examples: CoTExamples, view: str, tok, max_new_tokens: int,
                     states: Callable[[List[int]], torch.Tensor]) -> AnswerFn:
    """A student: decode `answer EOS` from `BOS x EOS` with states(positions) injected."""
    eos = examples.eos[view]

    def answer(model, positions):
        encs: List[Encoded] = [examples.get(view, p) for p in positions]
        with torch.no_grad():
            z = states(positions)
        outs = greedy_decode(model, [e.prompt(eos) for e in encs], eos, 1, max_new_tokens, z, tok.vocab_size)
        return [(output_text(o, eos, tok), answer_of(o, eos, False, tok)) for o in outs]

    return answer


class AnswerEvaluator(Evaluator):
    """Exact-match accuracy of a stage's answers on held-out lines; data-parallel replicas take
    interleaved slices and their counts are summed. Also the accuracy of each answer word by its
    position (a digit, in the multiplication files: it shows which digits a model gets), a word
    missing from an output counting wrong, and, given loss_task (the stage's Task over the same
    lines), its held-out loss per token. best/ is kept by accuracy, ties broken by the words right,
    then by the lower loss: a student that learns digits but no whole answer moves on from its first
    checkpoint. `records`: each line of this replica's share as the last call answered it;
    `all_records()`: every replica's, in file order; `samples()`: the first n_samples of this
    replica's, for the trainer's samples.jsonl."""

    def __init__(self, examples: CoTExamples, info, batch_size: int, answer: AnswerFn, loss_task=None,
                 n_samples: int = 0):
        self.examples, self.info, self.batch_size, self.answer = examples, info, batch_size, answer
        self.loss_task, self.n_samples = loss_task, n_samples
        self.mine = list(range(len(examples)))[info.dp_rank::info.dp_size]
        self.width = max(len(examples.answer_text(p).split()) for p in range(len(examples)))
        self.records: List[dict] = []

    def rank(self, result: dict) -> tuple:
        key = (result["accuracy"], result["word_accuracy"])
        return key + (-result["held_out_loss"],) if "held_out_loss" in result else key

    @torch.no_grad()
    def loss_sums(self, model, positions: List[int]) -> List[float]:
        """[summed loss, its count] of loss_task's single part on these lines."""
        batch = self.loss_task.micro_batch(positions, 0)
        (part,) = self.loss_task.weights
        return [float(self.loss_task.loss_sums(model, batch)[part]), float(batch.counts[part])]

    def __call__(self, model) -> dict:
        acc, self.records = Accuracy(), []
        words = torch.zeros(2, self.width, dtype=torch.float64)  # [right, asked] per answer-word position
        loss = torch.zeros(2, dtype=torch.float64)  # [summed loss, count]
        for s in range(0, len(self.mine), self.batch_size):
            positions = self.mine[s:s + self.batch_size]
            for p, (output, text) in zip(positions, self.answer(model, positions)):
                gold, index = self.examples.answer_text(p), self.examples.keep[p]
                ok = text is not None and same_answer(text, gold)
                acc.count(text, ok)
                self.records.append({"index": index, "question": self.examples.lines[index].input, "output": output,
                                     "prediction": text, "answer": gold, "correct": ok})
                said = (text or "").split()
                for i, word in enumerate(gold.split()):
                    words[0, i] += i < len(said) and said[i] == word
                    words[1, i] += 1
            if self.loss_task is not None:
                loss += torch.tensor(self.loss_sums(model, positions), dtype=torch.float64)
        counts = torch.cat([torch.tensor([acc.correct, acc.total, acc.unparsable], dtype=torch.float64), loss,
                            words.flatten()]).to(model.head_weight.device)
        if dist.is_initialized() and self.info.dp_size > 1:
            dist.all_reduce(counts, group=distributed.dp_group())
        c, t, u = (int(x) for x in counts[:3].tolist())
        right, asked = counts[5:].view(2, self.width).cpu()
        out = {**Accuracy(correct=c, total=t, unparsable=u).as_dict(),
               "word_accuracy": float(right.sum() / asked.sum().clamp(min=1)),
               "word_accuracy_by_position": [round(float(r / max(a, 1)), 4) for r, a in zip(right, asked)]}
        if self.loss_task is not None:
            out["held_out_loss"] = float(counts[3] / counts[4].clamp(min=1))
        return out

    def samples(self) -> List[dict]:
        """The first n_samples records of the last call in the trainer's fields (the question as its
        instruction, the line's answer as its label)."""
        return [{"index": r["index"], "instruction": r["question"], "output": r["output"], "prediction": r["prediction"],
                 "label": r["answer"], "correct": r["correct"]} for r in self.records[:self.n_samples]]

    def all_records(self) -> List[dict]:
        """Every line's record from the last call, all data-parallel replicas' shares, in file order."""
        shares = [self.records]
        if dist.is_initialized() and self.info.dp_size > 1:
            shares = [None] * self.info.dp_size
            dist.all_gather_object(shares, self.records, group=distributed.dp_group())
        return sorted((r for share in shares for r in share), key=lambda r: r["index"])


class StateErrorEvaluator(Evaluator):
    """The emulator's mean squared error per teacher-state element on held-out lines (lower is
    better: the emulator stage keeps its best/ by it): with LayerNorm'd states (the default) 1.0 is
    the error of predicting zeros, whatever the layer or the width. task: an EmulatorTask over those
    lines."""

    metric = "mse"
    higher_is_better = False

    def summary(self, result: dict) -> str:
        return f"state mse {result['mse']:.5g} ({result['total']} lines)"

    def __init__(self, task, info, batch_size: int):
        self.task, self.info, self.batch_size = task, info, batch_size
        self.mine = list(range(task.num_examples))[info.dp_rank::info.dp_size]

    @torch.no_grad()
    def __call__(self, model) -> dict:
        total = torch.zeros(2, dtype=torch.float64, device=model.head_weight.device)
        for s in range(0, len(self.mine), self.batch_size):
            batch = self.task.micro_batch(self.mine[s:s + self.batch_size], 0)
            total[0] += self.task.squared_error(model, batch).double()
            total[1] += batch.extra["elements"]
        if dist.is_initialized() and self.info.dp_size > 1:
            dist.all_reduce(total, group=distributed.dp_group())
        return {"mse": float(total[0] / total[1].clamp(min=1)), "total": self.task.num_examples}
