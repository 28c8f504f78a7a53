"""Sequence lengths of real distillation data for the training benches: the SVAMP teacher rationales
(700 questions x 10 rationales) under the LLaMA-2 tokenizer, each sequence the prompt template +
the question, then the rationale + EOS, as engine/distill/sft.py builds them. A fixed shape hides
what varying lengths do to the step (recompiles, graph breaks, padding); these do not.

The data is read from ../shared/data beside the checkout, or from a copy of its two files carried
to a bare GPU machine in .device-data/ (BENCHMARKS.md says how); without either, lengths come from a
generated distribution of the same shape, and one sentence says so."""
from __future__ import annotations

import json
import math
import os
import random
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVAMP = ("mcc", "SVAMP", "train.json")
TOKENIZER = ("tokenizers", "llama2.model")


def data_dir() -> Optional[str]:
    """The folder holding the SVAMP rationales and the LLaMA-2 tokenizer, or None."""
    for d in (os.path.join(os.path.dirname(ROOT), "shared", "data"), os.path.join(ROOT, ".device-data")):
        if os.path.isfile(os.path.join(d, *SVAMP)) and os.path.isfile(os.path.join(d, *TOKENIZER)):
            return d
    return None


def question_lengths(seed: int = 0) -> Tuple[List[List[Tuple[int, int]]], str]:
    """Per question, (prompt tokens, rationale tokens) of each of its rationales; and where they came from."""
    d = data_dir()
    if d is not None:
        from engine.text.prompts import format_prompt
        from engine.text.tokenizer import load_tokenizer

        tok = load_tokenizer(os.path.join(d, *TOKENIZER))
        with open(os.path.join(d, *SVAMP)) as f:
            records = json.load(f)
        out = []
        for r in records:
            prompt = len(tok.encode(format_prompt(r["instruction"]), bos=True))
            outputs = r["output"] if isinstance(r["output"], list) else [r["output"]]
            out.append([(prompt, len(tok.encode(o, bos=False, eos=True))) for o in outputs])
        return out, "SVAMP teacher rationales, LLaMA-2 tokenizer"
    rng = random.Random(seed)
    out = [[(p, min(1600, max(6, round(rng.lognormvariate(math.log(100), 0.6))))) for _ in range(10)]
           for p in (rng.randint(36, 101) for _ in range(700))]
    print("lengths: the SVAMP rationales and LLaMA-2 tokenizer are not in ../shared/data or .device-data, so "
          "sequence lengths come from a generated distribution (prompts 36-101 tokens, rationales log-normal "
          "around 100)", flush=True)
    return out, "generated (prompts 36-101 tokens, rationales log-normal around 100 tokens)"


def training_batches(questions: List[List[Tuple[int, int]]], batch: int, seq_len: int, n: int, pairs: bool = False,
                     seed: int = 0) -> List[List[Tuple[int, int]]]:
    """n batches of rows (prompt tokens, sequence tokens), in the trainer's order (engine/train/batching.py:
    seeded, bucketed by length); sequences cut at seq_len, questions whose prompt leaves fewer than 4
    response tokens dropped. pairs: each question gives two rows (its first two rationales), side by
    side, batch / 2 questions per batch (an MCC-KD step); else one rationale per question."""
    from engine.text.sequences import stable_rng
    from engine.train.batching import epoch_batches

    units = []
    for i, q in enumerate(questions):
        chosen = q[:2] if pairs else [q[stable_rng(seed, 0, i).randrange(len(q))]]
        if len(chosen) == (2 if pairs else 1) and all(p + 4 <= seq_len for p, _ in chosen):
            units.append([(p, min(p + r, seq_len)) for p, r in chosen])
    if not units:
        raise SystemExit(f"no question fits --seq_len {seq_len}")
    per_batch = max(1, batch // 2) if pairs else batch
    out, epoch = [], 0
    while len(out) < n:
        order = epoch_batches([max(length for _, length in u) for u in units], per_batch, seed, epoch)
        out += [[row for i in b for row in units[i]] for b in order]
        epoch += 1
    return out[:n]
