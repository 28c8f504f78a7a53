"""The training loop: optimizer, schedule, precision, accumulation, clipping, evaluation and logging;
saving and resuming are the Checkpointer's (engine/train/checkpointer.py), gradient bookkeeping under
tensor/data parallelism engine/train/gradients.py's. It never knows which objective it runs beyond the
task's interface (the Task base class of engine/train/task.py, which gives the defaults):

  task.num_examples                  records available for training
  task.lengths(epoch)                sequence length of each example this epoch (for bucketing)
  task.micro_batch(indices, epoch)   a batch object with .counts: {part: normaliser}, .n_tokens
  task.loss_sums(model, batch)       {part: summed loss tensor}
  task.weights                       {part: weight in the total loss}
  task.extra_modules()               (default []) modules trained beside the model (a small head, state
                                     maps), saved and resumed with the trainer state and checked finite
                                     before every save like the model
  task.parallel_models()             (default []) those of extra_modules() that are whole tensor-parallel
                                     models, as (model, LoRA config or None): their blocks run like the
                                     model's, their split weights count once in the gradient norm, their
                                     replicated KV heads sum their gradients
  task.groups                        (default None) a group per example (its data format; None: left
                                     out): every batch is formed from one group (Task.group_by)
  task.task_prefixes                 (default None) {task: instruction prefix} of a multi-task objective,
                                     recorded with every saved model for infer.py
  task.write_files(directory)        (default: nothing) the objective's own files in every saved model
                                     directory, after the model's (every rank of the first replica)
  task.start_step(model, step)       (default: nothing) before the micro-batches of step `step` are built,
                                     with the model being trained (on_policy samples from it there)
  task.step_metrics()                (default {}) the objective's own numbers for the step's metrics line

Of an evaluator (the Evaluator base class of engine/train/evaluator.py) it asks: evaluator(model), its
results (one evaluation line of metrics.jsonl); evaluator.metric and evaluator.higher_is_better, which
result keeps best/ and which way; evaluator.rank(result), the key best/ is kept by (compared as a
tuple: later entries break ties); evaluator.summary(result), the words it prints.

Loss = sum over parts of weight * (sum over the optimizer step) / (count over the optimizer step),
with sums and counts taken across accumulation micro-batches and data-parallel replicas, so
TP=2 == TP=1 and DP=2 x b == 1 x 2b. A step never waits for the device: its numbers are read back
when its metrics line is written, one step later (_flush_log).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from engine.runtime import distributed
from engine.runtime.cli import on_interrupt
from engine.runtime.distributed import to_device
from engine.runtime.errors import UserError
from engine.runtime.fileio import atomic_write_text, disk_errors
from engine.runtime.loggers import RunLoggers
from engine.runtime.plotting import plot_metrics
from engine.runtime.progress import Progress
from engine.train.batching import epoch_batches, grouped_epoch_batches
from engine.train.checkpointer import Checkpointer, run_signature
from engine.train.config import TrainConfig
from engine.train.evaluator import Evaluator
from engine.train.gradients import DynamicLossScaler, KVReplicaSync, all_reduce_coalesced, clip_gradients, param_copies
from engine.train.report import write_run_report
from engine.train.task import Task

# A run whose loss is not finite for more than this many optimizer steps in a row is stopped (fp16
# overflows are skipped steps and recover within a few; NaN weights or a diverged run never do).
MAX_NONFINITE_STEPS = 5


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


@dataclass
class RunSetup:
    """What a launcher adds to the loop's settings (a bare TrainConfig trains without any of it)."""

    base_ckpt: Optional[str] = None  # the checkpoint trained from: a saved LoRA adapter names it as its base
    deepspeed: Optional[str] = None  # DeepSpeed config JSON: ZeRO-1/2 over the data-parallel group
    template: Optional[str] = None  # the prompt template recorded with every saved model (None: not recorded)
    meta: dict = field(default_factory=dict)  # what run_config.json records of the run besides the trainer's


class Trainer:
    def __init__(self, model, task: Task, cfg: TrainConfig, info, tokenizer=None, evaluator: Optional[Evaluator] = None,
                 lora_cfg=None, setup: Optional[RunSetup] = None):
        setup = setup or RunSetup()
        self.model, self.task, self.cfg, self.info = model, task, cfg, info
        self.evaluator, self.lora_cfg, self.base_ckpt, self.run_meta = evaluator, lora_cfg, setup.base_ckpt, setup.meta
        if cfg.max_batch_size % info.dp_size:
            raise UserError(f"--max_batch_size={cfg.max_batch_size} is not divisible by the {info.dp_size} "
                            f"data-parallel replicas")
        if cfg.dtype == torch.float16 and setup.deepspeed:
            raise UserError("--use_float16 with --deepspeed: set fp16 in the DeepSpeed config instead")
        self.local_batch = cfg.max_batch_size // info.dp_size
        self._configure_layers()
        self.extra = list(task.extra_modules())
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.params += [p for m in self.extra for p in m.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("the model has no trainable parameters")
        self._gradient_bookkeeping()
        self._build_optimizer(setup.deepspeed)
        self.checkpointer = Checkpointer(cfg.save_dir, model, info, lora_cfg, setup.base_ckpt, tokenizer,
                                         setup.template, cfg.keep_checkpoints, task)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        # the rank of the best evaluation so far (evaluator.rank: higher is better); None before the first
        self.best_key: Optional[tuple] = None
        self.metrics_path = os.path.join(cfg.save_dir, "metrics.jsonl")
        torch.manual_seed(cfg.seed * 1000 + info.dp_rank)  # same dropout masks within a TP group

    def _gradient_bookkeeping(self) -> None:
        """Which parameters are copies on several tensor-parallel ranks (extra modules are replicated,
        a tensor-parallel model beside the model is split like it), and the KV-replica gradient sums."""
        info = self.info
        self.copies = {**param_copies(self.model, self.lora_cfg),
                       **{id(p): info.tp_size for m in self.extra for p in m.parameters()}}
        self.kv_syncs = [KVReplicaSync(self.model, info, self.lora_cfg)]
        for other, other_lora in self.task.parallel_models():
            self.copies.update(param_copies(other, other_lora))
            self.kv_syncs.append(KVReplicaSync(other, info, other_lora))

    def _build_optimizer(self, deepspeed_config: Optional[str]) -> None:
        """AdamW (decay on matrices only), the learning-rate schedule over the run's steps, fp16's loss
        scaler, and DeepSpeed around them when asked."""
        cfg, task = self.cfg, self.task
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        fused = self.info.device.type == "cuda" and not deepspeed_config  # one kernel for all parameters
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)
        n_batches = math.ceil(task.num_examples / cfg.max_batch_size)
        if task.groups is not None:
            n_batches = len(self._epoch_batches(0))
        self.steps_per_epoch = math.ceil(n_batches / cfg.accumulation_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.scaler = DynamicLossScaler() if cfg.dtype == torch.float16 else None
        self.ds_engine = None
        if deepspeed_config:
            self._init_deepspeed(deepspeed_config)

    def _configure_layers(self) -> None:
        """Regional compile (default on CUDA) and activation checkpointing, said in one line."""
        cfg, model = self.cfg, self.model
        compile_blocks = self.info.device.type == "cuda" if cfg.compile is None else bool(cfg.compile)
        for m in [model] + [other for other, _ in self.task.parallel_models()]:
            m.configure_layers(cfg.checkpoint_activations, cfg.checkpoint_fraction, compile_blocks)
        if self.info.is_main:
            how = ("decoder blocks compiled one by one (torch.compile)" if compile_blocks else "eager decoder blocks ("
                   + ("--compile False" if cfg.compile is False else
                      "CPU: compiling does not pay off here; --compile True to force it") + ")")
            if cfg.checkpoint_activations != "none":
                how += (f", activation checkpointing {cfg.checkpoint_activations} on {model.checkpoint_policy[1]} of "
                        f"{len(model.layers)} layers")
            print(f"training step: {how}", flush=True)

    # ----- DeepSpeed ZeRO over the data-parallel group ----------------------------------------
    def _init_deepspeed(self, config_path: str) -> None:
        """ZeRO-1/2 partitions the optimizer state (and, at stage 2, gradients) over the data-parallel
        group; the learning-rate schedule stays on our torch optimizer, whose param_groups ZeRO uses."""
        if self.info.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # present: TrainArgs checked before loading anything
        from fairscale.nn.model_parallel import initialize as mpu

        if any(sync.params for sync in self.kv_syncs):
            raise UserError("--deepspeed with tensor parallelism above n_kv_heads (replicated KV heads) is not supported")
        try:
            ds_cfg = json.load(open(config_path))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--deepspeed {config_path} is not a readable JSON file ({e})") from None
        stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise UserError(f"--deepspeed {config_path}: ZeRO stage {stage} is not supported (0, 1 or 2)")
        if ds_cfg.get("fp16", {}).get("enabled") or ds_cfg.get("bf16", {}).get("enabled"):
            raise UserError(f"--deepspeed {config_path}: leave fp16/bf16 out of the config and use "
                            f"--use_bfloat16 (weights and optimizer stay fp32, compute is autocast)")
        ds_cfg["train_micro_batch_size_per_gpu"] = self.local_batch
        ds_cfg["gradient_accumulation_steps"] = 1  # boundaries are set by hand, see _backward
        ds_cfg.pop("train_batch_size", None)
        ds_cfg["gradient_clipping"] = self.cfg.max_grad_norm
        ds_cfg.setdefault("steps_per_print", 10 ** 9)
        for p in self.params:  # DeepSpeed counts these on every TP rank in the global norm, others once
            p.tensor_model_parallel = self.copies.get(id(p), 1) == 1 and self.info.tp_size > 1
        self.ds_engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=ds_cfg, mpu=mpu, model_parameters=self.params)

    # ----- one optimizer step -------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.cfg.dtype)

    def _rank_slice(self, indices: List[int]) -> List[int]:
        r = self.info.dp_rank
        return indices[r * self.local_batch:(r + 1) * self.local_batch]

    def _optimizer_step(self, global_batches: List[List[int]]) -> dict:
        """One optimizer step. Nothing in it waits for the device (except fp16's overflow check and
        DeepSpeed's own): the returned loss parts, grad norm and token count are device tensors."""
        lr = self.optimizer.param_groups[0]["lr"]
        scale = self.scaler.scale if self.scaler else 1.0  # fp16: the loss scale of this step's backward
        self.task.start_step(self.model, self.step + 1)
        per_part, weights, n_tokens = self._backward(global_batches, scale)
        gnorm, skipped = self._apply_gradients(scale)
        if not skipped:
            self.scheduler.step()
        self.step += 1
        parts = list(self.task.weights)
        out = {"step": self.step, "epoch": self.epoch, "loss": (weights * per_part).sum(), "lr": lr,
               "grad_norm": gnorm, "n_tokens": n_tokens}
        if len(parts) > 1:
            out.update({f"loss_{p}": per_part[i] for i, p in enumerate(parts)})
        if self.scaler is not None:
            out.update({"loss_scale": self.scaler.scale, "skipped": skipped})
        out.update(self.task.step_metrics())
        return out

    def _backward(self, global_batches: List[List[int]], scale: float):
        """Forward and backward of every micro-batch of this rank, each loss part normalised by its
        count over the whole optimizer step (all micro-batches, all data-parallel replicas).
        Returns (loss per part, part weights, tokens in the step), device tensors."""
        dev = self.info.device
        micro = [self.task.micro_batch(self._rank_slice(b), self.epoch) for b in global_batches]
        parts = list(self.task.weights)
        counts = to_device(torch.tensor([[float(m.counts[p]) for p in parts] for m in micro]).sum(0), dev)
        n_tokens = to_device(torch.tensor(float(sum(m.n_tokens for m in micro))), dev)
        dist.all_reduce(counts, group=distributed.dp_group())
        dist.all_reduce(n_tokens, group=distributed.dp_group())
        norm = counts.clamp(min=1.0)
        weights = to_device(torch.tensor([float(self.task.weights[p]) for p in parts]), dev)
        sums = torch.zeros(len(parts), device=dev)
        for i, m in enumerate(micro):
            with self._autocast():
                s = self.task.loss_sums(self.model, m)
            stacked = torch.stack([s[p].float() for p in parts])
            loss = (weights * stacked / norm).sum()
            sums += stacked.detach()
            if self.ds_engine is not None:  # DeepSpeed averages over replicas; our loss is already a global mean
                self.ds_engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
                self.ds_engine.backward(loss * self.info.dp_size)
            else:
                (loss * scale).backward()
        dist.all_reduce(sums, group=distributed.dp_group())
        return sums / norm, weights, n_tokens

    def _apply_gradients(self, scale: float):
        """Sum replicated gradients, unscale, clip, step the optimizer. Returns (grad norm, skipped)."""
        if self.ds_engine is not None:
            self.ds_engine.step()
            return torch.tensor(float(self.ds_engine.get_global_grad_norm() or 0.0)), False
        for sync in self.kv_syncs:
            sync()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.info.dp_size > 1:
            all_reduce_coalesced(grads, distributed.dp_group())
        skipped = False
        if self.scaler is not None:  # one fused check and unscale, one host read
            skipped = self.scaler.unscale_(grads)
            self.scaler.update(skipped)
            scale = 1.0  # unscaled already
        gnorm = torch.tensor(float("nan"))
        if not skipped:
            if scale != 1.0:
                torch._foreach_div_(grads, scale)
            gnorm = clip_gradients(self.params, self.copies, self.cfg.max_grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm, skipped

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        cfg, groups = self.cfg, self.task.groups
        if groups is None:
            return epoch_batches(self.task.lengths(epoch), cfg.max_batch_size, cfg.seed, epoch, cfg.bucket)
        return grouped_epoch_batches(self.task.lengths(epoch), groups, cfg.max_batch_size, cfg.seed, epoch, cfg.bucket)

    # ----- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the last step (or --exit_after_steps), evaluating and saving on the way; returns the
        last metrics line written."""
        self._begin()
        shown = self.info.is_main and self.cfg.progress
        bar = Progress(self.total_steps, "training", "steps", initial=self.step) if shown else None
        if self.cfg.eval_at_start and self.step == 0 and self.evaluator:
            self._evaluate()
        self._open_metrics(bar)
        stop = False
        try:
            while not stop and self.step < self.total_steps:
                stop = self._train_epoch()
            self._end()
        finally:
            self.loggers.close()
        return self._last

    def _begin(self) -> None:
        """save_dir ready on every rank: resumed from its newest intact checkpoint, or checked free of
        checkpoints with an empty metrics file; then run_config.json."""
        cfg, info = self.cfg, self.info
        if info.is_main:
            os.makedirs(cfg.save_dir, exist_ok=True)
        self.run_signature = self._shared(run_signature(cfg) if info.is_main else None)
        on_interrupt(self._interrupt_note)
        distributed.barrier()
        if cfg.resume:
            self._resume()
        else:
            self.checkpointer.check_fresh_start()  # on every rank, so all of them stop with the same sentence
            if info.is_main:
                open(self.metrics_path, "w").close()
        distributed.barrier()
        self._write_run_meta()
        self.loggers = RunLoggers(cfg.save_dir, cfg.loggers, info.is_main, cfg.run_name, self.run_meta,
                                  cfg.wandb_project, cfg.wandb_mode, self.step if cfg.resume else None)

    def _train_epoch(self) -> bool:
        """The optimizer steps left in this epoch, each followed by its metrics and, when due, an
        evaluation and a save. Returns whether the run stops (its last step, or --exit_after_steps)."""
        cfg = self.cfg
        batches = self._epoch_batches(self.epoch)
        while self.batch_in_epoch < len(batches):
            group = batches[self.batch_in_epoch:self.batch_in_epoch + cfg.accumulation_steps]
            record = self._optimizer_step(group)
            self.batch_in_epoch += len(group)
            self._count_step(record)
            epoch_end = self.batch_in_epoch >= len(batches)
            if epoch_end:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            finished = self.step >= self.total_steps
            self._evaluate_and_save(epoch_end or finished)
            if finished or (cfg.exit_after_steps and self.step >= cfg.exit_after_steps):
                return True
            if epoch_end:
                return False
        return False

    def _evaluate_and_save(self, boundary: bool) -> None:
        """Evaluate, then save a checkpoint, when due: every --eval_every / --save_every steps, and at
        an epoch end or the last step (`boundary`). The time taken is not training time."""
        cfg, paused = self.cfg, time.time()
        if self.evaluator and ((cfg.eval_every and self.step % cfg.eval_every == 0) or boundary):
            self._flush_log()
            self._evaluate()
        if (cfg.save_every and self.step % cfg.save_every == 0) or boundary:
            self._flush_log()
            self.save_checkpoint()
        self._paused += time.time() - paused

    def _end(self) -> None:
        """The last metrics line, the progress bar closed, the curves and the report written."""
        cfg = self.cfg
        self._flush_log()
        if self._bar is not None:
            self._bar.close()
        if self.info.is_main and cfg.plot:
            with disk_errors(cfg.save_dir):
                plot_metrics(self.metrics_path, os.path.join(cfg.save_dir, "curves.png"))
                write_run_report(cfg.save_dir)
        distributed.barrier()

    # ----- metrics ------------------------------------------------------------------------------
    def _open_metrics(self, bar) -> None:
        """A fresh metrics window: nothing pending, no tokens or non-finite steps counted yet."""
        device = self.info.device
        self._bar, self._pending, self._last = bar, None, {}
        self._tokens = torch.zeros((), device=device)
        self._window_start, self._paused = time.time(), 0.0  # training time of a metrics line's steps
        self._nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self._worst_nonfinite = torch.zeros_like(self._nonfinite)

    def _count_step(self, record: dict) -> None:
        """Add an optimizer step to the metrics window; every --log_every steps (and at the last) its
        line is queued, to be written once the next one is (_flush_log)."""
        self._tokens += record.pop("n_tokens")
        if self._bar is not None:
            self._bar.update(1)
        self._track_finite(record["loss"])
        if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            self._flush_log()  # the previous line, now that this step is queued behind it
            now = time.time()
            record.update(n_tokens=self._tokens, nonfinite_run=self._worst_nonfinite,
                          window_s=now - self._window_start - self._paused)
            self._pending, self._tokens = record, torch.zeros((), device=self.info.device)
            self._worst_nonfinite = torch.zeros_like(self._nonfinite)
            self._window_start, self._paused = now, 0.0

    def _flush_log(self) -> None:
        """Write the pending step's metrics line: the one place a step's numbers are read back."""
        record, self._pending = self._pending, None
        if record is None:
            return
        values = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        values["tokens_per_s"] = values.pop("n_tokens") / max(values.pop("window_s"), 1e-9)
        nonfinite_run = int(values.pop("nonfinite_run"))
        self._last = values
        self._log(values)
        if self._bar is not None:
            self._bar.update(0, loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        if nonfinite_run > MAX_NONFINITE_STEPS:  # the same numbers on every rank: all stop together
            raise UserError(f"training stopped at step {values['step']}: the loss has been {values['loss']} for "
                            f"{nonfinite_run} steps in a row (NaN/Inf weights in --ckpt_dir "
                            f"{self.base_ckpt}, or too high a --lr {self.cfg.lr}); the checkpoints already "
                            f"saved in {self.cfg.save_dir} are left as they were")

    def _track_finite(self, loss: torch.Tensor) -> None:
        """Count on the device the steps in a row whose loss was NaN or Inf, and the longest such run
        since the last metrics line (checked when that line is written: no wait inside the step)."""
        self._nonfinite = torch.where(torch.isfinite(loss), torch.zeros_like(self._nonfinite), self._nonfinite + 1)
        self._worst_nonfinite = torch.maximum(self._worst_nonfinite, self._nonfinite)

    def _log(self, record: dict) -> None:
        if self.info.is_main:
            with disk_errors(self.metrics_path), open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.loggers.log(record)

    def _evaluate(self) -> None:
        """One evaluation line; best/ saved when the evaluator's metric beats the best so far."""
        evaluator = self.evaluator
        self.model.eval()
        result = evaluator(self.model)
        self.model.train()
        self._log({"step": self.step, "epoch": self.epoch, "eval": True, **result})
        if self.info.is_main:
            self.loggers.log_samples(self.step, evaluator.samples())
            print(f"[step {self.step}] eval {evaluator.summary(result)}", flush=True)  # above the bar
        key = tuple(evaluator.rank(result))
        better = self.best_key is None or key > self.best_key
        if better and self.checkpointer.save_model("best", extra={"step": self.step, **result}):
            self.best_key = key

    # ----- saving and resuming ------------------------------------------------------------------
    def _shared(self, value):
        """Rank 0's `value` on every rank (a signature is computed, and its files read, once)."""
        if self.info.world_size > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def _interrupt_note(self) -> str:
        """What an interrupted run keeps, and how to go on (one line, the same on every rank)."""
        kept = self.checkpointer.checkpoints()
        if not kept:
            return (
                f"no checkpoint was saved in {self.cfg.save_dir} yet (every --save_every steps and at each epoch "
                f"end); run the same command again to start over"
            )
        return f"{kept[-1]} (the newest checkpoint) is kept; add --resume True to the same command to continue from it"

    def _signature(self) -> dict:
        """What a resumed run must share with this one (see Checkpointer.resume)."""
        return {
            "run": getattr(self, "run_signature", None) or run_signature(self.cfg),
            "model_args": self.model.args.to_dict(),
            "tp_size": self.info.tp_size,
            "dp_size": self.info.dp_size,
            "lora": self.lora_cfg.to_dict() if self.lora_cfg else None,
            "seed": self.cfg.seed,
            "max_batch_size": self.cfg.max_batch_size,
            "deepspeed": self.ds_engine is not None,
        }

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "best_key": None if self.best_key is None else list(self.best_key),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        if self.ds_engine is None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.extra:
            state["extra_modules"] = [m.state_dict() for m in self.extra]
        self.checkpointer.save(self.step, state, self._signature(), self.ds_engine)

    def _resume(self) -> None:
        cfg = self.cfg
        path, state = self.checkpointer.resume(
            self._signature(),
            self.metrics_path,
            self.ds_engine,
            schedule_may_change=cfg.SCHEDULE_FLAGS if cfg.reset_schedule else frozenset(),
        )
        saved_extra = state.get("extra_modules", [])
        if len(saved_extra) != len(self.extra):  # a checkpoint of an older version (its run signature says more)
            raise UserError(
                f"--resume: {path} holds {len(saved_extra)} module(s) trained beside the model and this "
                f"run trains {len(self.extra)}; resume with the command and flags the run started with"
            )
        if self.ds_engine is None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for m, saved in zip(self.extra, state.get("extra_modules", [])):
            m.load_state_dict(saved)
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.best_key = state["batch_in_epoch"], self._saved_best(state)
        if cfg.reset_schedule:
            self._rebuild_schedule()

    def _rebuild_schedule(self) -> None:
        """--reset_schedule True: the schedule of this run's flags (peak --lr, shape, warm-up, final
        ratio, total steps) and its weight decay, at the step the resumed scheduler had reached."""
        cfg, sched = self.cfg, self.scheduler
        sched.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        sched.lr_lambdas = [lr_lambda(cfg, self.total_steps) for _ in self.optimizer.param_groups]
        for group, lam in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * lam(sched.last_epoch)
            group["weight_decay"] = cfg.weight_decay if all(p.dim() >= 2 for p in group["params"]) else 0.0
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.info.is_main:
            print(
                f"--reset_schedule: learning rate {self.optimizer.param_groups[0]['lr']:.3e} at step {self.step}",
                flush=True,
            )

    @staticmethod
    def _saved_best(state: dict) -> Optional[tuple]:
        """The best rank a checkpoint recorded (one from before ranks: its signed best score, whose
        starting values -1 and -inf meant none yet)."""
        if "best_key" in state:
            return None if state["best_key"] is None else tuple(state["best_key"])
        old = state.get("best_accuracy")
        return None if old is None or old in (-1.0, -math.inf) else (old,)

    def _write_run_meta(self) -> None:
        if self.info.is_main:
            meta = {**self.run_meta, **self._signature(), "total_steps": self.total_steps,
                    "steps_per_epoch": self.steps_per_epoch}
            atomic_write_text(os.path.join(self.cfg.save_dir, "run_config.json"), json.dumps(meta, indent=2, default=str))
