"""What the training loop needs: every setting of it, checked before any model loads."""
from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass
from typing import ClassVar, Optional

from engine.runtime.cli import check_seed, flag
from engine.runtime.errors import UserError
from models.transformer import CHECKPOINT_POLICIES


@dataclass(kw_only=True)
class TrainConfig:
    """What the training loop needs; every setting is checked here, before any model loads."""

    save_dir: str = flag("where checkpoint-N/, best/, metrics.jsonl and curves.png go.")
    epochs: int = flag("passes over the training data.", 1)
    max_steps: int = flag("total optimizer steps (> 0 overrides epochs).", 0)
    exit_after_steps: int = flag("stop after N steps as if preempted, keeping the full schedule (for resume).", 0)
    max_batch_size: int = flag("questions per micro-batch, summed over data-parallel replicas.", 4)
    accumulation_steps: int = flag("micro-batches per optimizer step.", 1)
    lr: float = flag("peak learning rate (AdamW).", 1e-5)
    weight_decay: float = flag("AdamW weight decay on matrices.", 0.0)
    warmup_steps: int = flag("linear warm-up steps.", 0)
    schedule: str = flag("cosine, linear or constant after warm-up.", "cosine")
    min_lr_ratio: float = flag("final learning rate as a fraction of lr.", 0.0)
    max_grad_norm: float = flag("clip the global gradient norm (0: off).", 1.0)
    use_float16: bool = flag("fp16 compute with dynamic loss scaling (overflowing steps are skipped).", False)
    use_bfloat16: bool = flag("bf16 compute.", False)
    seed: int = flag("seed of LoRA initialisation, data order and dropout.", 0)
    save_every: int = flag("also save a checkpoint every N steps (always at each epoch end).", 0)
    keep_checkpoints: int = flag("how many checkpoint-N directories to keep (0: all).", 2)
    eval_every: int = flag("also evaluate every N steps (always at each epoch end).", 0)
    eval_at_start: bool = flag("evaluate once before training.", False)
    log_every: int = flag("write a metrics line every N steps.", 1)
    resume: bool = flag(
        "continue from the latest checkpoint in save_dir (weights, optimizer, schedule, RNG, data position).", False
    )
    reset_schedule: bool = flag(
        "with --resume: rebuild the learning-rate schedule and weight decay from this run's --lr, --schedule, "
        "--warmup_steps, --min_lr_ratio, --weight_decay, --max_steps / --epochs (continuing at the step reached).",
        False,
    )
    overwrite: bool = flag(
        "write into a --save_dir that holds files no training run wrote (they are left there).", False
    )
    checkpoint_activations: typing.Any = flag(
        "recompute activations in backward to save memory: False/none, True/full (whole blocks), selective "
        "(keep matmul and attention outputs, recompute the rest).", False)
    checkpoint_fraction: float = flag("checkpoint only this fraction of the layers (from the first), e.g. 0.5.", 1.0)
    compile: Optional[bool] = flag(
        "compile each decoder block with torch.compile (default: on a GPU; False: eager).", None
    )
    log_to: Optional[str] = flag("also log to tensorboard (SAVE_DIR/tensorboard) and/or wandb, comma separated "
                                 "(optional extras; default: metrics.jsonl and curves.png only).", None)
    wandb_project: str = flag("the W&B project of --log_to wandb.", "cot-distill-engine")
    wandb_mode: Optional[str] = flag("W&B mode: online, offline (files in SAVE_DIR/wandb, `wandb sync` them later) "
                                     "or disabled; default: W&B's own (WANDB_MODE, else online).", None)
    run_name: Optional[str] = flag("the run's name in TensorBoard / W&B (default: the save_dir's name).", None)
    # flags a resumed run may change (they change how the run is kept, shown or computed, not its result),
    # and those it may change with --reset_schedule True; every other flag must match (run signature)
    RESUME_FREE: ClassVar[frozenset] = frozenset(
        {
            "save_dir",
            "resume",
            "reset_schedule",
            "overwrite",
            "exit_after_steps",
            "keep_checkpoints",
            "save_every",
            "eval_every",
            "eval_at_start",
            "eval_batch_size",
            "log_every",
            "compile",
            "checkpoint_activations",
            "checkpoint_fraction",
            "device",
            "tp_size",  # the tensor- and data-parallel sizes it gives are compared instead (Checkpointer)
            "log_to",
            "wandb_project",
            "wandb_mode",
            "run_name",
        }
    )
    SCHEDULE_FLAGS: ClassVar[frozenset] = frozenset(
        {"lr", "schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "max_steps", "epochs"}
    )
    # not flags
    betas: tuple = (0.9, 0.999)
    bucket: bool = True  # length bucketing of batches
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        from engine.runtime.precision import dtype_from_flags

        minimum = {"max_batch_size": 1, "accumulation_steps": 1, "log_every": 1, "epochs": 0, "max_steps": 0,
                   "exit_after_steps": 0, "warmup_steps": 0, "save_every": 0, "keep_checkpoints": 0, "eval_every": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise UserError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs == 0:
            raise UserError("--epochs 0 trains nothing; pass --epochs >= 1 or --max_steps > 0")
        for name in ("lr", "weight_decay", "min_lr_ratio", "max_grad_norm", "checkpoint_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"--weight_decay must be >= 0, got {self.weight_decay}")
        check_seed(self.seed)
        if self.reset_schedule and not self.resume:
            raise UserError("--reset_schedule True rebuilds the schedule of a resumed run; pass --resume True with it")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            raise UserError(f"--max_grad_norm must be >= 0 (0: off), got {self.max_grad_norm}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"--schedule {self.schedule!r} is not one of cosine, linear, constant")
        if os.path.exists(self.save_dir) and not os.path.isdir(self.save_dir):
            raise UserError(f"--save_dir {self.save_dir} exists and is a file, not a directory")
        policy = {True: "full", False: "none", "True": "full", "False": "none"}.get(self.checkpoint_activations,
                                                                                   self.checkpoint_activations)
        if policy not in CHECKPOINT_POLICIES:
            raise UserError(f"--checkpoint_activations {self.checkpoint_activations!r} is not one of "
                            f"True, False, {', '.join(CHECKPOINT_POLICIES)}")
        self.checkpoint_activations = policy
        if not 0 < self.checkpoint_fraction <= 1:
            raise UserError(f"--checkpoint_fraction must be in (0, 1], got {self.checkpoint_fraction}")
        self.dtype = dtype_from_flags(self.use_float16, self.use_bfloat16)
        from engine.runtime.loggers import parse_loggers

        self.loggers = parse_loggers(self.log_to, self.wandb_mode)
