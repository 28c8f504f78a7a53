"""The calibration job behind `infer.py calibration`: how well a model's confidence in its answer
predicts whether the answer is right.

Each record is answered by greedy decoding (the label task of a step-by-step model by default);
the confidence is the probability the model gave the FIRST TOKEN OF ITS ANSWER (the tokens that
spell the answer it states; for a label-task output, which is the answer alone, its first token),
read from one teacher-forced forward over prompt + output. An output whose answer cannot be found
in its tokens (no answer, or an equation whose value is the answer) uses its first token, and is
counted (`confidence_from_first_token`); unparsable answers count as wrong, never dropped. The
expected calibration error over equal-width bins, the bins themselves and a reliability diagram
(PNG) summarise it.
"""
from __future__ import annotations

import json
import os
from typing import List

import torch

from engine.runtime.jobs import job as runtime_job
from engine.text.answers import extract_answer, find_answer_span, is_correct
from engine.checkpoint import load_for_inference
from engine.infer.metrics import calibration_bins
from engine.runtime.fileio import atomic_open, atomic_write_text, disk_errors
from engine.infer.generation import Request, fit_prompt, generate_stream, request_seed
from engine.infer.jobs import GenerationJob
from engine.runtime.plotting import plot_reliability
from engine.text.prompts import format_prompt


def answer_token_index(tokenizer, tokens: List[int], text: str, prediction) -> tuple:
    """(index into `tokens` of the first token of the stated answer, whether it was found)."""
    if prediction is not None and tokens:
        span = find_answer_span(tokenizer, tokens, text, prediction)
        if span is not None:
            return span[0], True
    return 0, False


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


def run_calibration(job: GenerationJob, num_bins: int, plot_file: str) -> dict:
    with runtime_job(device=job.device, lock_file=job.output_file + ".lock", what=f"--output_file {job.output_file}") as info:
        model, tok, _ = load_for_inference(job.ckpt_dir, job.lora_dir, job.dtype, info.device)
        model.eval()
        limit = max(1, model.args.max_seq_len - job.params.max_new_tokens)
        prompts, truncated = [], 0
        for rec in job.records:
            ids = tok.encode(format_prompt(job.instruction(rec), job.template))
            truncated += len(ids) > limit
            prompts.append(fit_prompt(ids, limit, tok.bos_id))
        stop_ids = [tok.eos_id] if tok.eos_id is not None else []
        requests = [Request(i, p, request_seed(job.params.seed, i)) for i, p in enumerate(prompts)]
        generated = {c.key: c.tokens for c in generate_stream(model, requests, job.params, job.batch_size, stop_ids,
                                                              compiled=job.compile)}
        lines, sequences, positions = [], [], []
        for i, rec in enumerate(job.records):
            tokens = generated[i]
            answer_tokens = [t for t in tokens if t not in stop_ids]
            text = tok.decode(answer_tokens)
            prediction = extract_answer(text, job.task)
            index, found = answer_token_index(tok, answer_tokens, text, prediction)
            if not tokens:  # nothing generated at all (no room): the token the model would start with
                tokens = [tok.eos_id if tok.eos_id is not None else 0]
            sequences.append(prompts[i] + tokens)
            positions.append(len(prompts[i]) + index)
            lines.append({"id": rec.get("id", i), "index": i, "output": text, "label": rec.get("label"),
                          "prediction": prediction, "correct": is_correct(prediction, rec.get("label"), job.task),
                          "answer_token": tok.decode([tokens[index]]), "answer_token_found": found})
        confidences = token_probabilities(model, sequences, positions, tok.padding_id, job.batch_size)
        for line, conf in zip(lines, confidences):
            line["confidence"] = conf
        result = calibration_bins(confidences, [ln["correct"] for ln in lines], num_bins)
        summary = {"records": len(lines), "accuracy": sum(ln["correct"] for ln in lines) / len(lines),
                   "correct": sum(ln["correct"] for ln in lines), "ece": result["ece"], "num_bins": num_bins,
                   "mean_confidence": sum(confidences) / len(confidences),
                   "confidence_from_first_token": sum(not ln["answer_token_found"] for ln in lines),
                   "unparsable": sum(ln["prediction"] is None for ln in lines), "truncated_prompts": truncated,
                   "task_prefix": job.task_prefix, "reliability_diagram": plot_file, "bins": result["bins"]}
        if info.is_main:
            with disk_errors(job.output_file):
                with atomic_open(job.output_file, "w") as f:
                    for line in lines:
                        f.write(json.dumps(line, ensure_ascii=False) + "\n")
                atomic_write_text(job.output_file + ".summary.json", json.dumps(summary, indent=2) + "\n")
            with disk_errors(plot_file):
                where = os.path.join(*os.path.normpath(os.path.abspath(job.ckpt_dir)).split(os.sep)[-2:])
                plot_reliability(result["bins"], result["ece"], plot_file, f"{where}: {len(lines)} records")
            print(json.dumps({k: v for k, v in summary.items() if k != "bins"}), flush=True)
    return summary
