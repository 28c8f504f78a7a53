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
from engine.text.answers import extract_answer, find_answer_span, is_correct


def answer_token_index(tokenizer, tokens: List[int], text: str, prediction) -> tuple:
    """(index into `tokens` of the first token of the stated answer, whether it was found)."""
    if prediction is not None and tokens:
        span = find_answer_span(tokenizer, tokens, text, prediction)
        if span is not None:
            return span[0], True
    return 0, False


@torch.no_grad()
def token_probabilities(
    model, sequences: List[List[int]], positions: List[int], pad_id: int, batch_size: int
) -> List[float]:
    """p(sequences[b][positions[b]] | the tokens before it) under the model, by teacher forcing; only the
    one position per sequence is projected to the (gathered) vocabulary."""
    out = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    device = model.head_weight.device
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            x[row, : len(sequences[i])] = torch.tensor(sequences[i])
        h = model.forward_hidden(x.to(device))
        rows = torch.arange(len(chunk), device=device)
        at = torch.tensor([positions[i] - 1 for i in chunk], device=device)  # the position predicting it
        probs = torch.softmax(model.logits(h[rows, at]).float(), dim=-1)
        wanted = torch.tensor([sequences[i][positions[i]] for i in chunk], device=device)
        for row, i in enumerate(chunk):
            out[i] = float(probs[row, wanted[row]])
    return out


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
        generated = {
            c.key: c.tokens
            for c in generate_stream(model, requests, job.params, f.batch_size, stop_ids, compiled=f.compiled)
        }
        lines, sequences, positions = [], [], []
        for i, rec in enumerate(job.records):
            tokens = generated[i]
            answer_tokens = [t for t in tokens if t not in stop_ids]
            text = tok.decode(answer_tokens)
            prediction = extract_answer(text, f.task)
            index, found = answer_token_index(tok, answer_tokens, text, prediction)
            if not tokens:  # nothing generated at all (no room): the token the model would start with
                tokens = [tok.eos_id if tok.eos_id is not None else 0]
            sequences.append(prompts[i] + tokens)
            positions.append(len(prompts[i]) + index)
            lines.append(
                {
                    "id": rec.get("id", i),
                    "index": i,
                    "output": text,
                    "label": rec.get("label"),
                    "prediction": prediction,
                    "correct": is_correct(prediction, rec.get("label"), f.task),
                    "answer_token": tok.decode([tokens[index]]),
                    "answer_token_found": found,
                }
            )
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
    result = calibration_bins(confidences, [ln["correct"] for ln in lines], f.num_bins)
    return {
        "records": len(lines),
        "accuracy": sum(ln["correct"] for ln in lines) / len(lines),
        "correct": sum(ln["correct"] for ln in lines),
        "ece": result["ece"],
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
