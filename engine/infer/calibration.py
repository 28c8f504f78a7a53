"""The calibration job behind `infer.py calibration`: how well a model's confidence in its answer
predicts whether the answer is right.

Each record is answered by greedy decoding (the label task of a step-by-step model by default);
the confidence is the probability the model gave the FIRST TOKEN OF ITS ANSWER (the tokens that
spell the answer it states; for a label-task output, which is the answer alone, its first token
that spells something: under greedy decoding the largest probability of that step, Chen et al.'s
intended confidence when it is the first step), read from one teacher-forced forward over prompt +
output. An output whose answer cannot be found in its tokens (no answer, or an equation whose value
is the answer) uses its first token that spells something, and is counted
(`confidence_from_first_token`); unparsable answers count as wrong, never dropped. Correct means the
whole stated answer is right (--correctness answer) or, as Chen et al. meant (uncertainty.py:48-53),
that token's id equals the first token id of the gold label encoded as a response (token). Tokens
that spell nothing (the lone '▁' LLaMA's tokenizers put before digits) are skipped on both sides.
The expected calibration error over equal-width or equal-mass bins, the bins themselves and a
reliability diagram (PNG) summarise it.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import List, Optional

import torch

from engine.checkpoint import load_for_inference
from engine.infer.args import CalibrationArgs
from engine.infer.generation import Request, generate_stream, request_seed
from engine.infer.jobs import GenerationJob, owned_outputs
from engine.infer.metrics import calibration_bins
from engine.infer.prompting import encode_prompt, prompt_room
from engine.runtime.errors import UserError
from engine.runtime.fileio import atomic_open, atomic_write_text, disk_errors
from engine.runtime.jobs import job as runtime_job
from engine.runtime.outputs import Output
from engine.runtime.plotting import plot_reliability
from engine.text.answers import choices_in, extract_answer, find_answer_span, is_correct


def first_spelling_token(tokenizer, tokens: List[int]) -> int:
    """Index of the first token that spells something: LLaMA-style tokenizers write a number as a
    lone space piece and its digits (" 38" -> '▁', '3', '8'), and the space says nothing of the
    answer. 0 when none does."""
    for i, t in enumerate(tokens):
        if tokenizer.decode([t]).strip():
            return i
    return 0


def answer_token_index(tokenizer, tokens: List[int], text: str, prediction) -> tuple:
    """(index into `tokens` of the first token of the stated answer, whether it was found); not found:
    the first token that spells something."""
    if prediction is not None and tokens:
        span = find_answer_span(tokenizer, tokens, text, prediction)
        if span is not None:
            return span[0], True
    return first_spelling_token(tokenizer, tokens), False


@torch.no_grad()
def token_probabilities(model, sequences: List[List[int]], positions: List[int], pad_id: int,
                        batch_size: int) -> List[float]:
    """p(sequences[b][positions[b]] | the tokens before it) under the model, by teacher forcing; only the
    one position per sequence is projected to the (gathered) vocabulary."""
    out = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    device = model.head_weight.device
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            x[row, :len(sequences[i])] = torch.tensor(sequences[i])
        h = model.forward_hidden(x.to(device))
        rows = torch.arange(len(chunk), device=device)
        at = torch.tensor([positions[i] - 1 for i in chunk], device=device)  # the position predicting it
        probs = torch.softmax(model.logits(h[rows, at]).float(), dim=-1)
        wanted = torch.tensor([sequences[i][positions[i]] for i in chunk], device=device)
        for row, i in enumerate(chunk):
            out[i] = float(probs[row, wanted[row]])
    return out


def gold_first_token(tokenizer, label) -> Optional[int]:
    """The first token id of a gold label encoded as a response (as training encodes its targets)
    that spells something (first_spelling_token: '3' of '▁', '3', '8'); None for an empty label."""
    ids = tokenizer.encode(str(label).strip(), bos=False) if label is not None else []
    return ids[first_spelling_token(tokenizer, ids)] if ids else None


def record_line(tokenizer, rec: dict, i: int, tokens: List[int], stop_ids, task: str, correctness: str):
    """(the output line of record i, the generated tokens scored, the index of its answer token)."""
    answer_tokens = [t for t in tokens if t not in stop_ids]
    text = tokenizer.decode(answer_tokens)
    options = choices_in(rec.get("instruction"))  # CSQA answers and labels may be choice texts
    prediction = extract_answer(text, task, choices=options)
    index, found = answer_token_index(tokenizer, answer_tokens, text, prediction)
    if not tokens:  # nothing generated at all (no room): the token the model would start with
        tokens = [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    answer_right = is_correct(prediction, rec.get("label"), task, choices=options)
    gold = gold_first_token(tokenizer, rec.get("label"))
    token_right = tokens[index] == gold
    line = {
        "id": rec.get("id", i),
        "index": i,
        "output": text,
        "label": rec.get("label"),
        "prediction": prediction,
        "correct": token_right if correctness == "token" else answer_right,
        "answer_correct": answer_right,
        "token_correct": token_right,
        "answer_token": tokenizer.decode([tokens[index]]),
        "answer_token_index": index,
        "answer_token_id": tokens[index],
        "gold_token_id": gold,
        "answer_token_found": found,
    }
    return line, tokens, index


def calibration_job(flags: CalibrationArgs) -> GenerationJob:
    """The generation job of a calibration run; every record must carry a label."""
    job = GenerationJob.of(flags)
    for i, rec in enumerate(job.records):
        if "label" not in rec:
            raise UserError(f"{flags.data_file} record {i} lacks the key 'label' (calibration scores answers)")
    return job


def run_calibration(job: GenerationJob) -> dict:
    f = job.flags
    outputs = [
        Output("--output_file", f.output_file, beside=(f.output_file + ".summary.json",)),
        Output("--plot_file", f.plot_path),
    ]
    with runtime_job(device=f.device, **owned_outputs(f, outputs)) as info:
        model, tok, _ = load_for_inference(f.ckpt_dir, f.lora_dir, f.dtype, info.device)
        model.eval()
        room = prompt_room(model.args.max_seq_len, f.max_new_tokens)
        encoded = [encode_prompt(tok, job.instruction(rec), job.template, room) for rec in job.records]
        prompts, truncated = [p.ids for p in encoded], sum(p.cut for p in encoded)
        stop_ids = [tok.eos_id] if tok.eos_id is not None else []
        requests = [Request(i, p, request_seed(f.seed, i)) for i, p in enumerate(prompts)]
        generated = {c.key: c.tokens for c in generate_stream(model, requests, replace(job.params, vocab_size=tok.vocab_size), f.batch_size, stop_ids,
                                                              compiled=f.compiled)}
        lines, sequences, positions = [], [], []
        for i, rec in enumerate(job.records):
            line, tokens, index = record_line(tok, rec, i, generated[i], stop_ids, f.task, f.correctness)
            sequences.append(prompts[i] + tokens)
            positions.append(len(prompts[i]) + index)
            lines.append(line)
        confidences = token_probabilities(model, sequences, positions, tok.padding_id, f.batch_size)
        for line, conf in zip(lines, confidences):
            line["confidence"] = conf
        summary = _summary(job, lines, confidences, truncated)
        if info.is_main:
            _write(job, lines, summary)
            print(json.dumps({k: v for k, v in summary.items() if k != "bins"}), flush=True)
    return summary


def _summary(job: GenerationJob, lines: List[dict], confidences: List[float], truncated: int) -> dict:
    f = job.flags
    tiebreak = None
    if f.correctness == "token":  # the authors sort (prob, pred, label) tuples of token ids
        tiebreak = [
            (ln["answer_token_id"], ln["gold_token_id"] if ln["gold_token_id"] is not None else -1) for ln in lines
        ]
    result = calibration_bins(confidences, [ln["correct"] for ln in lines], f.num_bins, f.binning, tiebreak)
    return {
        "records": len(lines),
        "accuracy": sum(ln["correct"] for ln in lines) / len(lines),
        "correct": sum(ln["correct"] for ln in lines),
        "correctness": f.correctness,
        "answer_accuracy": sum(ln["answer_correct"] for ln in lines) / len(lines),
        "token_accuracy": sum(ln["token_correct"] for ln in lines) / len(lines),
        "ece": result["ece"],
        "binning": f.binning,
        "num_bins": f.num_bins,
        "mean_confidence": sum(confidences) / len(confidences),
        "confidence_from_first_token": sum(not ln["answer_token_found"] for ln in lines),
        "unparsable": sum(ln["prediction"] is None for ln in lines),
        "truncated_prompts": truncated,
        "task_prefix": job.task_prefix,
        "reliability_diagram": f.plot_path,
        "bins": result["bins"],
    }


def _write(job: GenerationJob, lines: List[dict], summary: dict) -> None:
    """The lines, the summary beside them and the reliability diagram."""
    f = job.flags
    with disk_errors(f.output_file):
        with atomic_open(f.output_file, "w") as out:
            for line in lines:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
        atomic_write_text(f.output_file + ".summary.json", json.dumps(summary, indent=2) + "\n")
    with disk_errors(f.plot_path):
        where = os.path.join(*os.path.normpath(os.path.abspath(f.ckpt_dir)).split(os.sep)[-2:])
        plot_reliability(summary["bins"], summary["ece"], f.plot_path, f"{where}: {len(lines)} records")
