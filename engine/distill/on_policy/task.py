"""The on-policy distillation task: each micro-batch's responses are written by the student (sampled
from its live weights), by the teacher (--seq_kd) or taken from the data file; the loss is the
divergence between the frozen teacher's and the student's next-token distributions at every response
token, a token mean over the optimizer step (one part, `divergence`)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from engine.distill.on_policy.sampling import DATA, STUDENT, Sampler, step_seed, writer_of
from engine.distill.sft import SFTData, SFTTask
from engine.infer.generation import SamplingParams, request_seed
from engine.runtime import distributed
from engine.runtime.fileio import atomic_write_text, disk_errors
from engine.text.sequences import IGNORE, pad_batch
from engine.train.task import Batch, make_batch


@dataclass(frozen=True)
class OnPolicySettings:
    """What the task does, from the flags (engine/distill/on_policy/args.py)."""

    lmbda: float  # fraction of micro-batches whose responses the student samples
    seq_kd: bool  # the other micro-batches: the teacher's samples (True) or the data file's rationales
    divergence: str  # forward_kl, reverse_kl or jsd
    jsd_beta: float
    kl_temperature: float
    sampling: SamplingParams  # temperature, top_p and max_new_tokens of every sampled response (seed unused)
    num_samples: int  # responses per prompt in a sampled micro-batch
    seed: int
    slots: int  # decoding rows: this replica's prompts per micro-batch x num_samples
    samples_file: Optional[str] = None  # save_dir/samples.jsonl, or None


def _clock(device) -> float:
    """Host time once the device has finished what was queued (a GPU runs ahead of the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class OnPolicyTask(SFTTask):
    """Prompts, rationales, lengths and data order are SFT's (sft.SFTData); a micro-batch the student or
    the teacher writes keeps the prompts and replaces the responses by num_samples samples of each.
    Counts: the response tokens, so the step's loss is the mean divergence per response token."""

    weights = {"divergence": 1.0}

    def __init__(self, data: SFTData, device, teacher, settings: OnPolicySettings, dtype=torch.float32,
                 compiled=None, is_main: bool = True):
        super().__init__(data, device)
        self.teacher, self.s, self.dtype, self.compiled, self.is_main = teacher, settings, dtype, compiled, is_main
        self.stop_ids = [data.tok.eos_id] if data.tok.eos_id is not None else []
        self.samplers: Dict[str, Sampler] = {}
        self.model, self.step, self.first_step = None, 0, None

    # ----- the step -----------------------------------------------------------------------------------
    def start_step(self, model, step: int) -> None:
        if self.first_step is None:
            self.first_step = step
            self._trim_samples_file(step)
        self.model, self.step, self.micro = model, step, 0
        self.writers: List[str] = []
        self.times = {"generation": 0.0, "teacher": 0.0}
        self.generated = [0, 0]  # sampled tokens, sampled responses (this replica)
        self.trained = [0, 0]  # response tokens, responses (this replica)
        dev = self.device
        self.sums = {w: torch.zeros(2, device=dev) for w in ("on", "off")}  # divergence sum, token count
        self.sample_lines: List[dict] = []
        self.started = _clock(dev)

    def sampler(self, writer: str) -> Sampler:
        if writer not in self.samplers:
            model = self.model if writer == STUDENT else self.teacher.model
            self.samplers[writer] = Sampler(model, self.s.sampling, self.s.slots, self.data.max_seq_len + 1,
                                            self.stop_ids, self.dtype, self.compiled)
        sampler = self.samplers[writer]
        if writer == STUDENT:
            sampler.model = self.model  # the model being trained, as the trainer hands it over each step
        return sampler

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        micro, self.micro = self.micro, self.micro + 1
        writer = writer_of(self.s.seed, self.step, micro, self.s.lmbda, self.s.seq_kd)
        self.writers.append(writer)
        records = [self.data.keep[p] for p in positions]
        if writer == DATA:
            pairs = [self.data.example(i, epoch) for i in records]
        else:
            pairs = self._sampled_pairs(records, writer)
        inputs, labels = pad_batch(pairs, self.pad_id)
        n = int((labels != IGNORE).sum())
        self.trained[0] += n
        self.trained[1] += len(pairs)
        return make_batch(inputs, labels, self.device, {"divergence": n}, sum(len(x) for x, _ in pairs),
                          {"writer": writer})

    def _sampled_pairs(self, records: List[int], writer: str):
        """num_samples responses per record, written by `writer`, as (input ids, labels) cut like SFT's."""
        seed = step_seed(self.s.seed, writer, self.step)
        asks = [(i, k) for i in records for k in range(self.s.num_samples)]
        started = _clock(self.device)
        done = self.sampler(writer).sample([self.data.prompts[i] for i, _ in asks],
                                           [request_seed(seed, i, k) for i, k in asks])
        self.times["generation"] += _clock(self.device) - started
        pairs = []
        for (i, k), (tokens, finish) in zip(asks, done):
            self.generated[0] += len(tokens)
            self.generated[1] += 1
            pairs.append(_example(self.data.prompts[i], tokens, self.data.max_seq_len))
            if self.s.samples_file:
                self.sample_lines.append({"step": self.step, "record": i, "sample": k, "writer": writer, "seed": seed,
                                          "tokens": tokens, "finish": finish,
                                          "text": self.data.tok.decode([t for t in tokens if t not in self.stop_ids])})
        return pairs

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        from models.vocab_parallel import head_divergence, logits_divergence

        started = _clock(self.device)
        target = self.teacher.dense_target(batch.inputs, batch.label_rows)  # first: holds no student activations
        self.times["teacher"] += _clock(self.device) - started
        hidden = model.forward_hidden(batch.inputs)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.label_rows)
        how = (self.s.kl_temperature, self.s.divergence, self.s.jsd_beta)
        head = model.head_matrix()
        if head is None:
            div = logits_divergence(model.logits(h, gather=False), target, *how)
        else:
            div = head_divergence(h, head, target, *how)
        side = self.sums["on" if batch.extra["writer"] == STUDENT else "off"]
        side += torch.stack([div.detach().float(), torch.tensor(float(batch.counts["divergence"]), device=side.device)])
        return {"divergence": div}

    def step_metrics(self) -> Dict[str, object]:
        """The step's on-policy fraction, sampled tokens, mean response length, the divergence on the
        student's samples and on the other responses, and the time split (generation, teacher forward,
        the rest of the step: the student's forward, backward and optimizer step), over every replica."""
        group = distributed.dp_group()
        sums = torch.cat([self.sums["on"], self.sums["off"]])
        counts = torch.tensor([*self.generated, *self.trained], dtype=torch.float64, device=sums.device)
        if dist.is_initialized():
            dist.all_reduce(sums, group=group)
            dist.all_reduce(counts, group=group)
        tokens, responses, trained, sequences = counts.tolist()
        total = _clock(self.device) - self.started
        out = {"on_policy_fraction": sum(w == STUDENT for w in self.writers) / max(1, len(self.writers)),
               "generated_tokens": int(tokens), "response_length": trained / max(1.0, sequences),
               "time_generation_s": self.times["generation"], "time_teacher_s": self.times["teacher"],
               "time_student_s": max(0.0, total - self.times["generation"] - self.times["teacher"])}
        for i, side in enumerate(("on_policy", "off_policy")):
            if any((w == STUDENT) == (side == "on_policy") for w in self.writers):
                out[f"divergence_{side}"] = sums[2 * i] / sums[2 * i + 1].clamp(min=1.0)
        self._write_samples(group)
        return out

    # ----- the samples file ---------------------------------------------------------------------------
    def _write_samples(self, group) -> None:
        if not self.s.samples_file:
            return
        lines = self.sample_lines
        if dist.is_initialized() and dist.get_world_size(group) > 1:  # every replica's samples, on rank 0
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, lines, group=group)
            lines = [line for part in gathered for line in part]
        if self.is_main and lines:
            lines.sort(key=lambda d: (d["record"], d["sample"]))
            with disk_errors(self.s.samples_file), open(self.s.samples_file, "a") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))

    def _trim_samples_file(self, step: int) -> None:
        """A run starting (or resuming) at `step` keeps only the samples of the steps before it."""
        path = self.s.samples_file
        if not path or not self.is_main:
            return
        kept = []
        if os.path.exists(path):
            for line in open(path):
                try:
                    if json.loads(line)["step"] < step:
                        kept.append(line)
                except (ValueError, KeyError):  # a line torn by a kill
                    break
        with disk_errors(path):
            atomic_write_text(path, "".join(kept))


def _example(prompt: List[int], response: List[int], max_seq_len: int):
    """(input ids, labels) of a prompt and a response, cut at max_seq_len like SFTData.example."""
    seq = (prompt + response)[: max_seq_len + 1]
    labels = [IGNORE] * (len(prompt) - 1) + seq[len(prompt):]
    return seq[:-1], labels[: len(seq) - 1]
