"""Offline generation, scoring and evaluation (fire CLI).

  torchrun --nproc_per_node N infer.py --ckpt_dir C --data_file F --output_file O.jsonl [--task GSM8K]
      [--batch_size 384] [--max_new_tokens 256] [--temperature 0] [--top_p 1] [--num_samples 1]
      [--template default|none] [--lora_dir L]
  python infer.py evaluate --task T --predictions_file O.jsonl [--label_file F] [--field output]
  torchrun --nproc_per_node N infer.py score --ckpt_dir C --data_file F --output_file O.jsonl [--top_k 5]
  torchrun --nproc_per_node N infer.py calibration --ckpt_dir C --data_file F --output_file O.jsonl --task T
  python infer.py bleu --predictions_file O.jsonl --references_file F
(--task_prefix label|rationale picks the task of a model trained with --objective step_by_step.)

The flags are checked here; the jobs are engine/infer/'s. Imports are inside the commands so
that --help and a mistyped flag answer at once.
"""
from __future__ import annotations

import json
import os
import sys

from engine.runtime.cli import run_cli


def generate(ckpt_dir: str, data_file: str, output_file: str, task: str = None, batch_size: int = 32,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, template: str = None, seed: int = 0, use_float16: bool = False,
             use_bfloat16: bool = False, lora_dir: str = None, stop: str = None, long_prompts: str = "skip",
             prefill_tokens: int = 16384, progress: bool = True, output_tokens: bool = False, compile: bool = True,
             device: str = None, task_prefix: str = None):
    """Generate responses for every record of data_file; one JSON line per record in output_file.

    Args:
        ckpt_dir: native checkpoint (one shard per tensor-parallel rank), an HF directory, or a LoRA adapter directory.
        data_file: MCC-KD JSON list or JSON lines with 'instruction' (and optional 'label', 'id').
        output_file: JSON lines; rerunning with the same file resumes (finished records are kept).
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH: extract the answers and score them against 'label'.
        batch_size: sequences decoded together (continuous batching refills finished slots).
        max_new_tokens: generation budget per response.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus sampling mass in (0, 1].
        top_k: sample from the k most likely tokens only (0: off).
        num_samples: responses per record, sampled independently (seeded by --seed and the record).
        template: prompt template: default (instruction / response) or none (verbatim after BOS); default: the checkpoint's.
        seed: sampling seed.
        use_float16: run in fp16.
        use_bfloat16: run in bf16.
        lora_dir: a LoRA adapter from training, merged into the weights.
        stop: stop string(s), comma separated, besides EOS; the output is cut before them.
        long_prompts: prompts leaving < max_new_tokens of room: skip (written with an error, counted wrong) or truncate (left).
        prefill_tokens: token budget of one prefill pass.
        progress: show a progress bar.
        output_tokens: also write the generated token ids ('tokens') of each response.
        compile: on a GPU, decode with CUDA graphs of a compiled step (False: eager; CPU is always eager).
        device: cpu or cuda (default: cuda when every process on this node has a GPU of its own).
        task_prefix: a step-by-step model's task: label (the default for such a model) or rationale.
    """
    from engine.infer.jobs import run_generation

    run_generation(_generation_job(ckpt_dir, data_file, output_file, task, batch_size, max_new_tokens, temperature,
                                   top_p, top_k, num_samples, template, seed, use_float16, use_bfloat16, lora_dir, stop,
                                   long_prompts, prefill_tokens, progress, output_tokens, compile, device, task_prefix))


def _generation_job(ckpt_dir, data_file, output_file, task, batch_size, max_new_tokens, temperature, top_p, top_k,
                    num_samples, template, seed, use_float16, use_bfloat16, lora_dir, stop, long_prompts,
                    prefill_tokens, progress, output_tokens, compile, device, task_prefix):
    """The flags of a generation job, checked (shared by generate and calibration)."""
    from engine.text.answers import check_task
    from engine.text.records import read_records
    from engine.runtime.errors import UserError
    from engine.infer.generation import SamplingParams
    from engine.infer.jobs import GenerationJob
    from engine.runtime.precision import dtype_from_flags
    from engine.text.prompts import resolve_task_prefix, resolve_template

    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0: off), got {top_k}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("prefill_tokens", prefill_tokens)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if long_prompts not in ("skip", "truncate"):
        raise UserError(f"--long_prompts must be skip or truncate, got {long_prompts!r}")
    if os.path.isdir(output_file):
        raise UserError(f"--output_file {output_file} is a directory")
    task_prefix, task_prefixes = resolve_task_prefix(task_prefix, ckpt_dir, lora_dir)
    return GenerationJob(
        ckpt_dir=ckpt_dir, data_file=data_file, output_file=output_file, records=read_records(data_file),
        template=resolve_template(template, ckpt_dir, lora_dir), dtype=dtype_from_flags(use_float16, use_bfloat16),
        params=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed),
        task=check_task(task) if task else None, num_samples=num_samples, batch_size=batch_size, lora_dir=lora_dir,
        stops=tuple(s for s in (stop.split(",") if isinstance(stop, str) else list(stop or [])) if s),
        long_prompts=long_prompts, prefill_tokens=prefill_tokens, progress=progress, output_tokens=output_tokens,
        compile=None if compile else False, device=device, task_prefix=task_prefix, task_prefixes=task_prefixes)


def score(ckpt_dir: str, data_file: str, output_file: str, batch_size: int = 16, template: str = None,
          lora_dir: str = None, use_float16: bool = False, use_bfloat16: bool = False, include_eos: bool = True,
          device: str = None, task_prefix: str = None, top_k: int = 0):
    """Per-record log-likelihood of `output` given `instruction`: sum and mean over the output tokens.

    Args:
        ckpt_dir: native checkpoint, HF directory, or LoRA adapter directory.
        data_file: records with 'instruction' and 'output' (a string, or a list: one score each).
        output_file: JSON lines in input order: id, index, sum_logprob, mean_logprob, n_tokens (lists for list outputs).
        batch_size: sequences per forward pass.
        template: prompt template: default or none; default: the one recorded with the checkpoint.
        lora_dir: a LoRA adapter merged into the weights.
        use_float16: run in fp16.
        use_bfloat16: run in bf16.
        include_eos: score the EOS that ends each output too.
        device: cpu or cuda (default: cuda when every process on this node has a GPU of its own).
        task_prefix: a step-by-step model's task: label (the default for such a model) or rationale.
        top_k: also write each output token's k most likely tokens and log-probabilities (tokens, topk_ids, topk_logprobs; OUTPUT.meta.json): a teacher file for train.py --objective teacher_kl (e.g. 5).
    """
    from engine.text.records import read_records, validate_training_records
    from engine.runtime.errors import UserError
    from engine.infer.jobs import run_scoring
    from engine.runtime.precision import dtype_from_flags
    from engine.text.prompts import resolve_task_prefix, resolve_template

    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    if top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0: no top-k), got {top_k}")
    if os.path.isdir(output_file):
        raise UserError(f"--output_file {output_file} is a directory")
    dtype = dtype_from_flags(use_float16, use_bfloat16)
    records = read_records(data_file)
    validate_training_records(records, data_file)
    task_prefix, task_prefixes = resolve_task_prefix(task_prefix, ckpt_dir, lora_dir)
    run_scoring(ckpt_dir, records, output_file, resolve_template(template, ckpt_dir, lora_dir), dtype, batch_size,
                lora_dir, include_eos, device, task_prefix, task_prefixes, top_k, data_file)


def evaluate(task: str, predictions_file: str, label_file: str = None, field: str = "output"):
    """Accuracy of a predictions file (or of any text field, e.g. the gold rationales of a data file).

    Args:
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH.
        predictions_file: JSON list or JSON lines holding `field` (and 'label' unless label_file is given).
        label_file: records whose 'label' is the gold answer, in the same order as the predictions.
        field: the text field to score; a list (several samples) scores each of its items.
    """
    from engine.text.answers import check_task, extract_answer
    from engine.text.records import read_records
    from engine.runtime.errors import DataError
    from engine.infer.metrics import Accuracy

    task = check_task(task)
    preds = read_records(predictions_file, required=())
    labels_src = read_records(label_file, required=()) if label_file else preds
    if len(labels_src) != len(preds):
        raise DataError(f"{label_file} has {len(labels_src)} records but {predictions_file} has {len(preds)}")
    acc = Accuracy()
    for i, (p, l) in enumerate(zip(preds, labels_src)):
        if "label" not in l:
            raise DataError(f"{label_file or predictions_file} record {i} lacks the key 'label'")
        value = p.get(field, "")
        for text in (value if isinstance(value, list) else [value]) or [""]:
            acc.add(extract_answer(text if isinstance(text, str) else "", task), l["label"], task)
    print(json.dumps(acc.as_dict()))


def calibration(ckpt_dir: str, data_file: str, output_file: str, task: str, batch_size: int = 32,
                max_new_tokens: int = 256, num_bins: int = 10, plot_file: str = None, template: str = None,
                task_prefix: str = None, lora_dir: str = None, use_float16: bool = False, use_bfloat16: bool = False,
                device: str = None):
    """Calibration error (ECE) of the first answer token's probability vs correctness, with a reliability diagram.

    Args:
        ckpt_dir: native checkpoint, HF directory, or LoRA adapter directory.
        data_file: records with 'instruction' and 'label'.
        output_file: JSON lines per record (output, prediction, correct, confidence); the summary goes to OUTPUT.summary.json.
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH: how answers are read and scored.
        batch_size: sequences decoded (and scored) together.
        max_new_tokens: generation budget per answer.
        num_bins: equal-width confidence bins of the calibration error.
        plot_file: the reliability diagram (PNG); default: OUTPUT without its extension + .reliability.png.
        template: prompt template: default or none; default: the one recorded with the checkpoint.
        task_prefix: a step-by-step model's task: label (the default for such a model) or rationale.
        lora_dir: a LoRA adapter merged into the weights.
        use_float16: run in fp16.
        use_bfloat16: run in bf16.
        device: cpu or cuda (default: cuda when every process on this node has a GPU of its own).
    """
    from engine.infer.calibration import run_calibration
    from engine.runtime.errors import UserError

    if num_bins < 1:
        raise UserError(f"--num_bins must be >= 1, got {num_bins}")
    job = _generation_job(ckpt_dir, data_file, output_file, task, batch_size, max_new_tokens, 0.0, 1.0, 0, 1, template,
                          0, use_float16, use_bfloat16, lora_dir, None, "truncate", 16384, False, False, True, device,
                          task_prefix)
    for i, rec in enumerate(job.records):
        if "label" not in rec:
            raise UserError(f"{data_file} record {i} lacks the key 'label' (calibration scores answers)")
    run_calibration(job, num_bins, plot_file or os.path.splitext(output_file)[0] + ".reliability.png")


def bleu(predictions_file: str, references_file: str, field: str = "output", reference_field: str = "output"):
    """Corpus BLEU (sacreBLEU's default: 13a tokens, 4-grams) of generated rationales against the teacher's.

    Args:
        predictions_file: JSON list or JSON lines holding `field` (one generated text per record).
        references_file: records in the same order whose `reference_field` holds the teacher rationale (or a list: several references).
        field: the generated text field.
        reference_field: the reference text field.
    """
    from engine.text.records import read_records
    from engine.runtime.errors import DataError
    from engine.infer.metrics import corpus_bleu

    preds = read_records(predictions_file, required=())
    refs = read_records(references_file, required=())
    if len(refs) != len(preds):
        raise DataError(f"{references_file} has {len(refs)} records but {predictions_file} has {len(preds)}")
    hyps, references = [], []
    for i, (p, r) in enumerate(zip(preds, refs)):
        if not isinstance(p.get(field), str):
            raise DataError(f"{predictions_file} record {i}: '{field}' must be one generated text (a string)")
        value = r.get(reference_field)
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(x, str) and x.strip() for x in items):
            raise DataError(f"{references_file} record {i}: '{reference_field}' must be a non-empty rationale "
                            f"or a list of them")
        hyps.append(p[field])
        references.append(items)
    result = corpus_bleu(hyps, references)
    print(json.dumps({"bleu": round(result["bleu"], 4), "records": len(hyps),
                      "precisions": [round(x, 4) for x in result["precisions"]],
                      "brevity_penalty": round(result["brevity_penalty"], 6), "hyp_len": result["hyp_len"],
                      "ref_len": result["ref_len"]}))


COMMANDS = {"generate": generate, "evaluate": evaluate, "score": score, "calibration": calibration, "bleu": bleu}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        run_cli(COMMANDS)
    else:
        run_cli(generate)
