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


def read_eval_records(label_file: Optional[str], max_examples: int = 0):
    from engine.data import read_records

    if not label_file:
        return None
    records = read_records(label_file)
    for i, r in enumerate(records):
        if "label" not in r:
            raise UserError(f"{label_file} record {i} lacks the key 'label'")
    return records[:max_examples] if max_examples > 0 else records


def report_data(data, path: str, info) -> None:
    if info.is_main:
        msg = f"{path}: {len(data)} training examples"
        if data.truncated:
            msg += f", {data.truncated} truncated to --max_seq_len={data.max_seq_len}"
        if data.dropped:
            msg += f", {data.dropped} dropped (prompt alone reaches --max_seq_len)"
        print(msg, flush=True)
