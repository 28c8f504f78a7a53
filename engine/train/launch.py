"""The training run behind train.py and train_mcc.py: every flag is checked before the process group
forms (engine/train/args.py and each objective's args), the job then owns save_dir (a second job on it stops at once), and only then
do the model and data load."""
from __future__ import annotations

import os
from typing import Optional

import torch

from engine.checkpoint import load_model
from engine.infer.prompting import check_room
from engine.runtime.errors import UserError
from engine.runtime.jobs import job
from engine.runtime.outputs import Output, args_inputs
from engine.text.answers import label_warning, unreadable_labels
from engine.text.records import read_records
from engine.text.tokenizer import check_tokenizer_fits, load_tokenizer
from engine.train.args import TrainArgs, run_record
from engine.train.batching import format_groups, group_by_format
from engine.train.checkpointer import precheck_resume
from engine.train.trainer import RunSetup, Trainer
from models.lora import LoRAConfig, apply_lora
from models.registry import parse_model_type


def build_model(ckpt_dir: str, model_type: Optional[str], lora_rank: int, lora_alpha, lora_dropout: float,
                lora_targets, dtype: torch.dtype, info, seed: int = 0):
    """Load the checkpoint for this rank; add LoRA when asked. Returns (model, lora_cfg or None).

    LoRA: frozen base in `dtype`, adapter in fp32. Full fine-tuning: fp32 weights (autocast computes
    in `dtype`), so optimizer updates never round to half precision."""
    use_lora = lora_rank is not None and lora_rank > 0
    if model_type is not None:
        _, lora_variant = parse_model_type(model_type)
        if lora_variant and not use_lora:
            raise UserError(f"--model_type {model_type} is a LoRA variant: pass --lora_rank > 0")
        if use_lora and not lora_variant:
            raise UserError(f"--lora_rank {lora_rank} with --model_type {model_type}: use lora-{model_type} "
                            f"for LoRA, or --lora_rank -1 for full fine-tuning")
    model = load_model(ckpt_dir, dtype=dtype if use_lora else torch.float32, device=info.device, model_type=model_type)
    lora_cfg = None
    if use_lora:
        lora_cfg = LoRAConfig(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets, seed=seed)
        apply_lora(model, lora_cfg)
    model.train()
    return model, lora_cfg


def model_from_flags(args, info):
    """build_model as a run's flags ask: its CheckpointFlag and ModelFlags, its precision and seed."""
    return build_model(args.ckpt_dir, args.model_type, args.lora_rank, args.lora_alpha, args.lora_dropout,
                       args.lora_targets, args.dtype, info, args.seed)


def read_eval_records(label_file: Optional[str], max_examples: int = 0, task: Optional[str] = None, scoring="ours"):
    """The evaluation records; labels that cannot be read for `task` are counted in a warning (they
    score wrong and appear as unparsable_labels in the evaluation lines)."""
    if not label_file:
        return None
    records = read_records(label_file)
    for i, r in enumerate(records):
        if "label" not in r:
            raise UserError(f"{label_file} record {i} lacks the key 'label'")
    records = records[:max_examples] if max_examples > 0 else records
    bad = unreadable_labels(records, task, scoring) if task else []
    if bad and os.environ.get("RANK", "0") == "0":
        print(label_warning(bad, len(records), task, label_file), flush=True)
    return records


RUN_FILES = ("run_config.json", "metrics.jsonl", "best")


def written_by_training(save_dir: str) -> bool:
    """Whether a save_dir holds a training run's files (continued, or refused with --resume advice, by
    the checkpointer) rather than files of something else."""
    names = os.listdir(save_dir) if os.path.isdir(save_dir) else []
    return any(n in RUN_FILES or n.startswith("checkpoint-") for n in names)


def owned_save_dir(args) -> dict:
    """The keyword arguments of engine/runtime/jobs.job that guard a training run's --save_dir: never an
    input of the run nor inside or around one, locked (SAVE_DIR/.lock) for the whole run, and, when it
    holds files no training run wrote, used only with --overwrite True. A --resume is compared with the
    run signature of the checkpoint it would continue, before anything loads."""
    out = Output("--save_dir", args.save_dir, is_dir=True, lock=os.path.join(args.save_dir, ".lock"))
    precheck_resume(args)
    return dict(outputs=[out], inputs=args_inputs(args), overwrite=args.overwrite, continues=written_by_training)


def run_training(args: TrainArgs) -> None:
    records = read_records(args.train_file)
    groups = format_groups(records, args.formats, args.train_file)  # one data format per batch
    eval_records = read_eval_records(args.label_file, args.max_eval_examples, args.task, args.scoring)
    if eval_records:
        check_room(args.max_new_tokens, args.ckpt_dir, model_type=args.model_type)
    with job(args.tp_size, args.device, **owned_save_dir(args)) as info:
        tok = load_tokenizer(args.ckpt_dir)
        model, lora_cfg = model_from_flags(args, info)
        check_tokenizer_fits(tok, model.args.vocab_size, args.ckpt_dir)
        task = args.make_task(records, tok, min(args.max_seq_len, model.args.max_seq_len), info)
        formats = group_by_format(task, groups)
        if formats and info.is_main:
            print(f"{args.train_file}: {formats}", flush=True)
        evaluator = None
        if eval_records:
            evaluator = args.make_evaluator(eval_records, tok, info)
        setup = RunSetup(base_ckpt=args.ckpt_dir, deepspeed=args.deepspeed, template=args.template,
                         meta=run_record(args))
        trainer = Trainer(model, task, args, info, tok, evaluator, lora_cfg, setup)
        trainer.fit()
