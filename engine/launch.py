"""What the training launchers share: model + LoRA set-up, evaluation data, the trainer run."""
from __future__ import annotations

import os
from typing import Optional

import torch

from engine.errors import UserError


def build_model(ckpt_dir: str, model_type: Optional[str], lora_rank: int, lora_alpha, lora_dropout: float,
                lora_targets, dtype: torch.dtype, info, seed: int = 0):
    """Load the checkpoint for this rank; add LoRA when asked. Returns (model, lora_cfg or None).

    LoRA: frozen base in `dtype`, adapter in fp32. Full fine-tuning: fp32 weights (autocast computes
    in `dtype`), so optimizer updates never round to half precision."""
    from engine.checkpoint import load_model
    from engine.lora import LoRAConfig, apply_lora
    from models.registry import parse_model_type

    use_lora = lora_rank is not None and lora_rank > 0
    if model_type is not None:
        _, lora_variant = parse_model_type(model_type)
        if lora_variant and not use_lora:
            raise UserError(f"--model_type {model_type} is a LoRA variant: pass --lora_rank > 0")
        if use_lora and not lora_variant:
            raise UserError(f"--lora_rank {lora_rank} with --model_type {model_type}: use lora-{model_type} "
                            f"for LoRA, or --lora_rank -1 for full fine-tuning")
    model = load_model(ckpt_dir, dtype=dtype if use_lora else torch.float32, device=info.device,
                       model_type=model_type)
    lora_cfg = None
    if use_lora:
        lora_cfg = LoRAConfig(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                              targets=lora_targets, seed=seed)
        apply_lora(model, lora_cfg)
    model.train()
    return model, lora_cfg


def read_eval_records(label_file: Optional[str], max_examples: int = 0, task: Optional[str] = None):
    """The evaluation records; labels that cannot be read for `task` are counted in a warning (they
    score wrong and appear as unparsable_labels in the evaluation lines)."""
    from engine.data import read_records
    from engine.evaluation import label_warning, unreadable_labels

    if not label_file:
        return None
    records = read_records(label_file)
    for i, r in enumerate(records):
        if "label" not in r:
            raise UserError(f"{label_file} record {i} lacks the key 'label'")
    records = records[:max_examples] if max_examples > 0 else records
    bad = unreadable_labels(records, task) if task else []
    if bad and os.environ.get("RANK", "0") == "0":
        print(label_warning(bad, len(records), task, label_file), flush=True)
    return records


def report_data(data, path: str, info) -> None:
    if info.is_main:
        msg = f"{path}: {len(data)} training examples"
        if data.truncated:
            msg += f", {data.truncated} truncated to --max_seq_len={data.max_seq_len}"
        if data.dropped:
            msg += f", {data.dropped} dropped (prompt alone reaches --max_seq_len)"
        print(msg, flush=True)


# One line per flag shared by train.py and train_mcc.py (their --help is built from this table).
TRAIN_FLAG_DOCS = {
    "task": "GSM8K / SVAMP / ASDiv / CSQA / ARITH: how answers are read during evaluation.",
    "ckpt_dir": "native checkpoint with one shard per tensor-parallel rank (or an HF directory).",
    "save_dir": "where checkpoint-N/, best/, metrics.jsonl and curves.png go.",
    "train_file": "MCC-KD JSON list: instruction, output (a rationale or a list of them), label.",
    "label_file": "evaluation records (instruction, label), scored by greedy generation.",
    "model_type": "registry name; a lora- prefix means LoRA (the checkpoint's params.json wins for shapes).",
    "max_batch_size": "questions per micro-batch, summed over data-parallel replicas.",
    "lora_rank": "LoRA rank (> 0 with a lora- model type); -1 for full fine-tuning.",
    "lora_alpha": "LoRA alpha (scaling alpha / rank); default: the rank.",
    "lora_dropout": "dropout on the LoRA input.",
    "lora_targets": "comma-separated projections to adapt: wq,wk,wv,wo (attention), w1,w2,w3 (MLP), output (head).",
    "eval_batch_size": "sequences decoded together during evaluation.",
    "epochs": "passes over the training data.",
    "use_float16": "fp16 compute with dynamic loss scaling (overflowing steps are skipped).",
    "use_bfloat16": "bf16 compute.",
    "lr": "peak learning rate (AdamW).",
    "weight_decay": "AdamW weight decay on matrices.",
    "warmup_steps": "linear warm-up steps.",
    "schedule": "cosine, linear or constant after warm-up.",
    "min_lr_ratio": "final learning rate as a fraction of lr.",
    "max_grad_norm": "clip the global gradient norm (0: off).",
    "accumulation_steps": "micro-batches per optimizer step.",
    "max_seq_len": "cut longer sequences (counted and reported).",
    "max_new_tokens": "generation budget during evaluation.",
    "template": "prompt template: default or none (recorded with every saved checkpoint for infer.py).",
    "seed": "seed of LoRA initialisation, data order and dropout.",
    "save_every": "also save a checkpoint every N steps (always at each epoch end).",
    "keep_checkpoints": "how many checkpoint-N directories to keep (0: all).",
    "eval_every": "also evaluate every N steps (always at each epoch end).",
    "eval_at_start": "evaluate once before training.",
    "max_eval_examples": "evaluate on the first N label_file records only (0: all).",
    "log_every": "write a metrics line every N steps.",
    "resume": "continue from the latest checkpoint in save_dir (weights, optimizer, schedule, RNG, data position).",
    "checkpoint_activations": "recompute activations in backward to save memory: False/none, True/full (whole blocks), selective (keep matmul and attention outputs, recompute the rest).",
    "checkpoint_fraction": "checkpoint only this fraction of the layers (from the first), e.g. 0.5.",
    "compile": "compile each decoder block with torch.compile (default: on a GPU; False: eager).",
    "deepspeed": "DeepSpeed config JSON: ZeRO stage 1/2 over the data-parallel group.",
    "tp_size": "tensor-parallel size (default: all processes); world size / tp_size replicas train data-parallel.",
    "max_steps": "total optimizer steps (> 0 overrides epochs).",
    "exit_after_steps": "stop after N steps as if preempted, keeping the full schedule (for resume).",
    "alpha": "weight of the consistency (symmetric KL) term.",
    "temperature": "softening temperature T of the answer-span distributions.",
    "num_rationales": "rationales per question per step (>= 2); every pair among them is compared.",
    "recompute_spans": "ignore the file's indices and find the answer spans anew.",
    "keep_wrong_rationales": "also train on rationales whose answer differs from the label (dropped by default).",
}


def document(fn, summary: str):
    """Give a launcher a --help that explains every flag in one line (from TRAIN_FLAG_DOCS)."""
    import inspect

    lines = [summary, "", "Args:"]
    for name in inspect.signature(fn).parameters:
        lines.append(f"    {name}: {TRAIN_FLAG_DOCS[name]}")
    fn.__doc__ = "\n".join(lines)
    return fn


def run_training(kind: str, **flags) -> None:
    """The whole run behind train.py (kind="sft") and train_mcc.py (kind="mcc"): every flag is
    checked before the process group forms, the job then owns save_dir (a second job on it stops at
    once), and only then do the model and data load."""
    from engine import distributed
    from engine.data import MultiRationaleData, SFTData, format_prompt, read_records
    from engine.evaluation import GenerationEvaluator, check_task
    from engine.lock import own_output
    from engine.precision import dtype_from_flags
    from engine.tasks import MCCTask, SFTTask
    from engine.tokenizer import check_tokenizer_fits, load_tokenizer
    from engine.trainer import TrainConfig, Trainer

    f = flags
    task = check_task(f["task"])
    dtype = dtype_from_flags(f["use_float16"], f["use_bfloat16"])
    format_prompt("", f["template"])
    if kind == "mcc":  # flag checks that need no model
        MCCTask.check(f["alpha"], f["temperature"], f["num_rationales"])
    for name in ("eval_batch_size", "max_new_tokens"):
        if f[name] < 1:
            raise UserError(f"--{name} must be >= 1, got {f[name]}")
    if f["max_seq_len"] < 2:
        raise UserError(f"--max_seq_len must be >= 2, got {f['max_seq_len']}")
    cfg = TrainConfig(save_dir=f["save_dir"], epochs=f["epochs"], max_batch_size=f["max_batch_size"],
                      accumulation_steps=f["accumulation_steps"], lr=f["lr"], min_lr_ratio=f["min_lr_ratio"],
                      weight_decay=f["weight_decay"], warmup_steps=f["warmup_steps"], schedule=f["schedule"],
                      max_grad_norm=f["max_grad_norm"], max_steps=f["max_steps"],
                      exit_after_steps=f["exit_after_steps"], dtype=dtype, seed=f["seed"],
                      save_every=f["save_every"], keep_checkpoints=f["keep_checkpoints"], eval_every=f["eval_every"],
                      eval_at_start=f["eval_at_start"], log_every=f["log_every"], resume=f["resume"],
                      checkpoint_activations=f["checkpoint_activations"],
                      checkpoint_fraction=f["checkpoint_fraction"], compile=f["compile"])
    if f["deepspeed"]:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"--deepspeed {f['deepspeed']} needs the deepspeed package (pip install deepspeed)")
    records = read_records(f["train_file"])
    eval_records = read_eval_records(f["label_file"], f["max_eval_examples"], task)
    info = distributed.setup(f["tp_size"])
    lock = own_output(os.path.join(f["save_dir"], ".lock"), f"--save_dir {f['save_dir']}", info, make_dir=True)
    try:
        tok = load_tokenizer(f["ckpt_dir"])
        model, lora_cfg = build_model(f["ckpt_dir"], f["model_type"], f["lora_rank"], f["lora_alpha"],
                                      f["lora_dropout"], f["lora_targets"], dtype, info, f["seed"])
        check_tokenizer_fits(tok, model.args.vocab_size, f["ckpt_dir"])
        max_len = min(f["max_seq_len"], model.args.max_seq_len)
        if kind == "mcc":
            data = MultiRationaleData(records, tok, max_len, f["template"], f["seed"], f["train_file"],
                                      f["num_rationales"], not f["recompute_spans"], task,
                                      f["keep_wrong_rationales"])
            if info.is_main:
                print(f"{f['train_file']}: {data.describe()}", flush=True)
            job = MCCTask(data, info.device, f["alpha"], f["temperature"])
        else:
            data = SFTData(records, tok, max_len, f["template"], f["seed"], f["train_file"])
            report_data(data, f["train_file"], info)
            job = SFTTask(data, info.device)
        evaluator = None
        if eval_records:
            evaluator = GenerationEvaluator(eval_records, tok, task, info, f["eval_batch_size"], f["max_new_tokens"],
                                            f["template"])
        meta = {"launcher": "train_mcc.py" if kind == "mcc" else "train.py", **{k: v for k, v in f.items()}}
        trainer = Trainer(model, job, cfg, info, tok, evaluator, lora_cfg, f["ckpt_dir"], f["deepspeed"],
                          run_meta=meta, template=f["template"])
        trainer.fit()
    finally:
        if lock is not None:
            lock.release()
    distributed.teardown()
