"""Offline generation and evaluation (fire CLI).

  torchrun --nproc_per_node N infer.py --ckpt_dir C --data_file F --output_file O.jsonl [--task GSM8K]
  python infer.py evaluate --task T --predictions_file O.jsonl [--label_file F] [--field output]
"""
from __future__ import annotations

import json
import sys
import time

from engine.cli import run_cli


def generate(ckpt_dir: str, data_file: str, output_file: str, task: str = None, batch_size: int = 32,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, template: str = "default", seed: int = 0, use_float16: bool = False,
             use_bfloat16: bool = False, lora_dir: str = None):
    """Generate a response for every record of data_file and write one JSON line per record.

    Args:
        ckpt_dir: native checkpoint directory (one shard per tensor-parallel rank), or an HF directory.
        data_file: MCC-KD JSON list or JSON lines with 'instruction' (and optional 'label').
        output_file: JSON lines written in input order.
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH: extract answers and score them against 'label'.
        batch_size: prompts decoded together.
        max_new_tokens: generation budget per response.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep only the k most likely tokens when sampling (0: off).
        num_samples: responses sampled per record.
        template: prompt template: default (instruction/response) or none (the instruction verbatim).
        seed: sampling seed.
        use_float16: run in fp16.
        use_bfloat16: run in bf16.
        lora_dir: a LoRA adapter from training, merged into the weights for generation (ckpt_dir may
            also be the adapter directory itself: its base is read from lora_config.json).
    """
    import torch

    from engine import distributed
    from engine.lora import load_for_inference
    from engine.data import format_prompt, read_records
    from engine.errors import UserError
    from engine.evaluation import Accuracy, check_task, extract_answer
    from engine.fileio import atomic_open
    from engine.generation import SamplingParams, generate as run_generation
    from engine.precision import dtype_from_flags
    from engine.tokenizer import load_tokenizer

    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}")
    task = check_task(task) if task else None
    dtype = dtype_from_flags(use_float16, use_bfloat16)
    records = read_records(data_file)
    info = distributed.setup()
    model, base_dir = load_for_inference(ckpt_dir, lora_dir, dtype, info.device)
    model.eval()
    tok = load_tokenizer(base_dir)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    prompts = [format_prompt(r["instruction"], template) for r in records]
    acc, n_tokens, start = Accuracy(), 0, time.time()
    out = atomic_open(output_file, "w") if info.is_main else None
    f = out.__enter__() if out else None
    for lo in range(0, len(records), batch_size):
        batch = list(range(lo, min(lo + batch_size, len(records))))
        ids = [tok.encode(prompts[i]) for i in batch for _ in range(num_samples)]
        new = run_generation(model, ids, params, stop_ids=[tok.eos_id] if tok.eos_id is not None else [])
        n_tokens += sum(len(x) for x in new)
        for j, i in enumerate(batch):
            texts = [tok.decode([t for t in x if t != tok.eos_id]) for x in new[j * num_samples:(j + 1) * num_samples]]
            line = {"id": records[i].get("id", i), "prompt": prompts[i],
                    "output": texts[0] if num_samples == 1 else texts}
            if "label" in records[i]:
                line["label"] = records[i]["label"]
            if task:
                preds = [extract_answer(t, task) for t in texts]
                oks = [acc.add(p, records[i].get("label"), task) for p in preds]
                line["prediction"], line["correct"] = (preds[0], oks[0]) if num_samples == 1 else (preds, oks)
            if f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    if out:
        out.__exit__(None, None, None)
    wall = time.time() - start
    summary = {"records": len(records), "generated_tokens": n_tokens, "tokens_per_s": n_tokens / wall, "wall_s": wall}
    if task:
        summary.update(acc.as_dict())
    if info.is_main:
        print(json.dumps(summary))
    distributed.teardown()
    return None


def evaluate(task: str, predictions_file: str, label_file: str = None, field: str = "output"):
    """Accuracy of a predictions file (or any text field, e.g. gold rationales).

    Args:
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH.
        predictions_file: JSON list or JSON lines holding `field` (and 'label' unless label_file is given).
        label_file: records whose 'label' is the gold answer, in the same order as the predictions.
        field: which text field of each prediction record to score.
    """
    from engine.data import DataError, read_records
    from engine.evaluation import check_task, score

    task = check_task(task)
    preds = read_records(predictions_file, required=())
    labels_src = read_records(label_file, required=()) if label_file else preds
    if len(labels_src) != len(preds):
        raise DataError(f"{label_file} has {len(labels_src)} records but {predictions_file} has {len(preds)}")
    texts = []
    for i, r in enumerate(preds):
        value = r.get(field, "")
        texts.append(value[0] if isinstance(value, list) and value else value if isinstance(value, str) else "")
    for i, r in enumerate(labels_src):
        if "label" not in r:
            raise DataError(f"{label_file or predictions_file} record {i} lacks the key 'label'")
    result = score(texts, [r["label"] for r in labels_src], task).as_dict()
    print(json.dumps(result))
    return None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("generate", "evaluate"):
        run_cli({"generate": generate, "evaluate": evaluate})
    else:
        run_cli(generate)
