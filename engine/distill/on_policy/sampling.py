"""Who writes a micro-batch's responses, with which seeds, and the decoder call that samples them.

Every random choice is a function of (--seed, step, ...) alone, never of a random state, so a resumed
run, another tensor-parallel size or another data-parallel split samples exactly what the
uninterrupted run would:
  - whether micro-batch m of optimizer step s is on-policy: a hash of (seed, s, m) against --lmbda;
  - the seed of sample k of record r at step s: request_seed(step_seed(seed, writer, s), r, k), the
    seed `infer.py --seed step_seed(...)` gives record r of the same training file (infer.py seeds
    request (i, k) with request_seed(--seed, i, k)), so its samples can be reproduced from a checkpoint.
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence, Tuple

import torch

from engine.infer.generation import Batcher, Request, SamplingParams, make_runner, request_seed

STUDENT, TEACHER, DATA = "student", "teacher", "data"  # who writes a micro-batch's responses


def step_seed(seed: int, writer: str, step: int) -> int:
    """The --seed of the samples `writer` (student or teacher) draws at optimizer step `step`."""
    return request_seed(seed, "on_policy", writer, step)


def writer_of(seed: int, step: int, micro: int, lmbda: float, seq_kd: bool) -> str:
    """Who writes micro-batch `micro` (0-based within the step) of step `step`: the student with
    probability lmbda (a hash of (seed, step, micro): the same on every rank and after a resume), else
    the teacher under --seq_kd, else the data file."""
    u = request_seed(seed, "lmbda", step, micro) / float(1 << 31)  # uniform in [0, 1)
    if u < lmbda:
        return STUDENT
    return TEACHER if seq_kd else DATA


class Sampler:
    """Responses of one model (the live student, or the frozen teacher under --seq_kd) from the
    engine's decoder (engine/infer/generation.py): continuous batching over `slots` rows of a KV
    cache of max_len positions, the step runner make_runner picks (CUDA graphs of the compiled decode
    step on a GPU, eager on CPU). The runner, its cache and its captured graphs are made once and
    reused every step: they hold the model's parameters by address, and the optimizer updates those
    in place, so each step samples from the weights as they are then (tests/test_on_policy.py checks
    it). The model decodes in eval mode (no dropout) and goes back to its mode after."""

    def __init__(self, model, params: SamplingParams, slots: int, max_len: int, stop_ids: Sequence[int],
                 dtype=torch.float32, compiled=None):
        self.model, self.params, self.slots, self.max_len = model, params, slots, max_len
        self.stop_ids, self.dtype, self.compiled = list(stop_ids), dtype, compiled
        self.runner = None

    def _precision(self):
        """The run's compute precision. The autocast weight cache stays off: a cast copy made before a
        CUDA graph's capture would be what the graph reads, never refreshed by an optimizer step."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        device = self.model.head_weight.device.type
        return torch.autocast(device_type=device, dtype=self.dtype, cache_enabled=False)

    @torch.no_grad()
    def sample(self, prompts: List[List[int]], seeds: List[int]) -> List[Tuple[List[int], str]]:
        """(new tokens, finish) per prompt, in prompt order; a stop id, when reached, is the last token."""
        if self.runner is None:
            self.model.decode_attention("auto")  # the fused kernel on a GPU where it passes its check
            self.runner = make_runner(self.model, self.compiled)
        training = self.model.training
        self.model.eval()
        try:
            with self._precision():
                requests = [Request(i, list(p), s) for i, (p, s) in enumerate(zip(prompts, seeds))]
                batcher = Batcher(self.model, self.runner, self.params, self.slots, self.max_len, self.stop_ids,
                                  refill_min=1)
                done = {c.key: (c.tokens, c.finish) for c in batcher.run(requests)}
        finally:
            self.model.train(training)
        return [done[i] for i in range(len(prompts))]
