"""The training loop: optimizer, schedule, precision, accumulation, clipping, evaluation,
save / resume, logging. It never knows which objective it runs beyond the task's interface:

  task.num_examples                  records available for training
  task.lengths(epoch)                sequence length of each example this epoch (for bucketing)
  task.micro_batch(indices, epoch)   a batch object with .counts: {part: normaliser}, .n_tokens
  task.loss_sums(model, batch)       {part: summed loss tensor}
  task.weights                       {part: weight in the total loss}

Loss = sum over parts of weight * (sum over the optimizer step) / (count over the optimizer step),
with sums and counts taken across accumulation micro-batches and data-parallel replicas, so
TP=2 == TP=1 and DP=2 x b == 1 x 2b.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from engine import distributed
from engine.data import epoch_batches
from models.transformer import CHECKPOINT_POLICIES
from engine.errors import UserError
from engine.fileio import atomic_torch_save, atomic_write_text
from engine.objectives import to_device


@dataclass
class TrainConfig:
    save_dir: str
    epochs: int = 1
    max_batch_size: int = 4  # sequences per micro-batch, summed over data-parallel replicas
    accumulation_steps: int = 1
    lr: float = 1e-5
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    max_steps: int = 0  # > 0: total optimizer steps (overrides epochs for the schedule and the end)
    exit_after_steps: int = 0  # > 0: stop after this many steps, as if preempted (schedule unchanged)
    dtype: torch.dtype = torch.float32
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_at_start: bool = False
    log_every: int = 1
    resume: bool = False
    checkpoint_activations: object = False  # False / "none", True / "full", "selective" (-> the policy name)
    checkpoint_fraction: float = 1.0  # of the layers, from the first
    compile: Optional[bool] = None  # regional torch.compile of the blocks; None: on CUDA
    bucket: bool = True
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        """Every setting is checked here, before any model loads: one sentence per mistake."""
        minimum = {"max_batch_size": 1, "accumulation_steps": 1, "log_every": 1, "epochs": 0, "max_steps": 0,
                   "exit_after_steps": 0, "warmup_steps": 0, "save_every": 0, "keep_checkpoints": 0, "eval_every": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise UserError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs == 0:
            raise UserError("--epochs 0 trains nothing; pass --epochs >= 1 or --max_steps > 0")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
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


# A run whose loss is not finite for more than this many optimizer steps in a row is stopped (fp16
# overflows are skipped steps and recover within a few; NaN weights or a diverged run never do).
MAX_NONFINITE_STEPS = 5


# ----------------------------------------------------------------------------------------------
# Tensor-parallel bookkeeping
# ----------------------------------------------------------------------------------------------
def tp_copies(model) -> Dict[int, int]:
    """id(param) -> how many tensor-parallel ranks hold an identical copy of it (1: sharded)."""
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    from engine.lora import LoRAColumnParallelLinear
    from models.transformer import Expert

    tp = model.tp_size
    expert_linears = {id(m) for e in model.modules() if isinstance(e, Expert) for m in e.children()}
    copies = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name in ("lora_A", "lora_B"):  # column: A replicated, B sharded; row: the reverse
                column = isinstance(module, LoRAColumnParallelLinear)
                n = tp if (name == "lora_A") == column else 1
            elif isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) or id(module) in expert_linears:
                n = 1
            elif isinstance(module, RowParallelLinear):
                n = 1 if name == "weight" else tp
            else:
                n = tp  # norms, MoE router
            copies[id(p)] = n
    kv_copies = max(tp // model.args.n_kv_heads, 1)
    for p in model.replicated_kv_params():
        copies[id(p)] = kv_copies
    return copies


class KVReplicaSync:
    """Sums the gradients of KV projections copied on several tensor-parallel ranks over the ranks
    that share each head (their true gradient is the sum of every copy's contribution)."""

    def __init__(self, model, info):
        self.params = [p for p in model.replicated_kv_params() if p.requires_grad]
        self.group = None
        if not self.params:
            return
        tp_start = info.rank - info.tp_rank
        for dp_base in range(0, info.world_size, info.tp_size):  # every rank creates every group
            for members in model.kv_replica_groups():
                g = dist.new_group([dp_base + m for m in members])
                if dp_base == tp_start and info.tp_rank in members:
                    self.group = g

    def __call__(self):
        if self.group is not None:
            _all_reduce_coalesced([p.grad for p in self.params if p.grad is not None], self.group)


def _all_reduce_coalesced(tensors: List[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
    if not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, op=op, group=group)
        for t, synced in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(synced)


def clip_gradients(params, copies: Dict[int, int], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (every distinct tensor-parallel piece counted once), and the
    gradients scaled down to max_norm when above it (max_norm <= 0: not clipped). Everything stays
    on the device: one foreach norm, one all-reduce, one foreach multiply; nothing waits for it."""
    grads = [p.grad for p in params if p.grad is not None]
    inv_copies = torch.tensor([1.0 / copies.get(id(p), 1) for p in params if p.grad is not None])
    squares = torch.stack(torch._foreach_norm(grads)).float().pow(2)
    total = (squares * to_device(inv_copies, squares.device)).sum()
    dist.all_reduce(total, group=distributed.tp_group())
    norm = total.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


class DynamicLossScaler:
    """fp16 loss scaling: multiply the loss by `scale`; on inf/nan gradients (on any rank) skip the
    step and halve the scale; after `growth_interval` good steps double it."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000, min_scale: float = 1.0):
        self.scale, self.growth_interval, self.min_scale = init_scale, growth_interval, min_scale
        self.good_steps = 0

    def found_inf(self, params) -> bool:
        flag = torch.zeros((), device=params[0].device)
        for p in params:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                flag.fill_(1.0)
                break
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank skips together
        return bool(flag.item())

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale / 2, self.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, s):
        self.scale, self.good_steps = s["scale"], s["good_steps"]


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


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model, task, cfg: TrainConfig, info, tokenizer=None, evaluator=None, lora_cfg=None,
                 base_ckpt: Optional[str] = None, deepspeed_config: Optional[str] = None, run_meta: dict = None,
                 template: Optional[str] = None):
        self.model, self.task, self.cfg, self.info = model, task, cfg, info
        self.tokenizer, self.evaluator, self.lora_cfg, self.base_ckpt = tokenizer, evaluator, lora_cfg, base_ckpt
        self.template = template  # the prompt template, recorded with every saved model
        self.run_meta = run_meta or {}
        if cfg.max_batch_size % info.dp_size:
            raise UserError(f"--max_batch_size={cfg.max_batch_size} is not divisible by the {info.dp_size} "
                            f"data-parallel replicas")
        if cfg.dtype == torch.float16 and deepspeed_config:
            raise UserError("--use_float16 with --deepspeed: set fp16 in the DeepSpeed config instead")
        self.local_batch = cfg.max_batch_size // info.dp_size
        policy = cfg.checkpoint_activations
        compile_blocks = info.device.type == "cuda" if cfg.compile is None else bool(cfg.compile)
        model.configure_layers(policy, cfg.checkpoint_fraction, compile_blocks)
        if info.is_main:
            print("training step: " + (f"decoder blocks compiled one by one (torch.compile)" if compile_blocks else
                  "eager decoder blocks (" + ("--compile False" if cfg.compile is False else "CPU: compiling does "
                                              "not pay off here; --compile True to force it") + ")")
                  + (f", activation checkpointing {policy} on {model.checkpoint_policy[1]} of {len(model.layers)} layers"
                     if policy != "none" else ""), flush=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("the model has no trainable parameters")
        self.copies = tp_copies(model)
        self.kv_sync = KVReplicaSync(model, info)
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        fused = info.device.type == "cuda" and not deepspeed_config  # one kernel for all parameters
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)
        n_batches = math.ceil(task.num_examples / cfg.max_batch_size)
        self.steps_per_epoch = math.ceil(n_batches / cfg.accumulation_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.scaler = DynamicLossScaler() if cfg.dtype == torch.float16 else None
        self.ds_engine = None
        if deepspeed_config:
            self._init_deepspeed(deepspeed_config)
        self.step, self.epoch, self.batch_in_epoch, self.best_accuracy = 0, 0, 0, -1.0
        self.metrics_path = os.path.join(cfg.save_dir, "metrics.jsonl")
        torch.manual_seed(cfg.seed * 1000 + info.dp_rank)  # same dropout masks within a TP group

    # ----- DeepSpeed ZeRO over the data-parallel group ----------------------------------------
    def _init_deepspeed(self, config_path: str) -> None:
        """ZeRO-1/2 partitions the optimizer state (and, at stage 2, gradients) over the data-parallel
        group; the learning-rate schedule stays on our torch optimizer, whose param_groups ZeRO uses."""
        if self.info.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # present: run_training checked before loading anything
        from fairscale.nn.model_parallel import initialize as mpu

        if self.kv_sync.params:
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
        ds_cfg["gradient_accumulation_steps"] = 1  # boundaries are set by hand, see _optimizer_step
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
        DeepSpeed's own): the returned loss parts, grad norm and token count are device tensors,
        read back only when a metrics line is written (see _flush_log)."""
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
        scale = self.scaler.scale if self.scaler else 1.0
        ds = self.ds_engine
        for i, m in enumerate(micro):
            with self._autocast():
                s = self.task.loss_sums(self.model, m)
            stacked = torch.stack([s[p].float() for p in parts])
            loss = (weights * stacked / norm).sum()
            sums += stacked.detach()
            if ds is not None:  # DeepSpeed averages over replicas; our loss is already a global mean
                ds.set_gradient_accumulation_boundary(i == len(micro) - 1)
                ds.backward(loss * self.info.dp_size)
            else:
                (loss * scale).backward()
        dist.all_reduce(sums, group=distributed.dp_group())
        per_part = sums / norm
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = False
        if ds is not None:
            ds.step()
            gnorm = torch.tensor(float(ds.get_global_grad_norm() or 0.0))
        else:
            self.kv_sync()
            if self.info.dp_size > 1:
                _all_reduce_coalesced([p.grad for p in self.params if p.grad is not None], distributed.dp_group())
            if self.scaler is not None:
                skipped = self.scaler.found_inf(self.params)
                self.scaler.update(skipped)
            gnorm = torch.tensor(float("nan"))
            if not skipped:
                if scale != 1.0:
                    torch._foreach_div_([p.grad for p in self.params if p.grad is not None], scale)
                gnorm = clip_gradients(self.params, self.copies, self.cfg.max_grad_norm)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            self.scheduler.step()
        self.step += 1
        out = {"step": self.step, "epoch": self.epoch, "loss": (weights * per_part).sum(), "lr": lr,
               "grad_norm": gnorm, "n_tokens": n_tokens}
        if len(parts) > 1:
            out.update({f"loss_{p}": per_part[i] for i, p in enumerate(parts)})
        if self.scaler is not None:
            out.update({"loss_scale": self.scaler.scale, "skipped": skipped})
        return out

    # ----- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        if info.is_main:
            os.makedirs(cfg.save_dir, exist_ok=True)
        distributed.barrier()
        if cfg.resume:
            self._resume()
        else:
            self._check_fresh_start()  # on every rank, so all of them stop with the same sentence
            if info.is_main:
                open(self.metrics_path, "w").close()
        distributed.barrier()
        self._write_run_meta()
        bar = None
        if info.is_main and cfg.progress:
            from engine.progress import Progress

            bar = Progress(self.total_steps, "training", "steps", initial=self.step)
        if cfg.eval_at_start and self.step == 0 and self.evaluator:
            self._evaluate()
        self._bar, self._pending, self._last = bar, None, {}
        self._tokens, self._flushed_at = torch.zeros((), device=info.device), time.time()
        self._nonfinite = torch.zeros((), dtype=torch.long, device=info.device)
        self._worst_nonfinite = torch.zeros_like(self._nonfinite)
        stop = False
        while not stop and self.step < self.total_steps:
            batches = epoch_batches(self.task.lengths(self.epoch), cfg.max_batch_size, cfg.seed, self.epoch, cfg.bucket)
            while self.batch_in_epoch < len(batches):
                group = batches[self.batch_in_epoch:self.batch_in_epoch + cfg.accumulation_steps]
                record = self._optimizer_step(group)
                self.batch_in_epoch += len(group)
                self._tokens += record.pop("n_tokens")
                if bar is not None:
                    bar.update(1)
                self._track_finite(record["loss"])
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._flush_log()  # the previous line, now that this step is queued behind it
                    record.update(n_tokens=self._tokens, nonfinite_run=self._worst_nonfinite)
                    self._pending, self._tokens = record, torch.zeros((), device=info.device)
                    self._worst_nonfinite = torch.zeros_like(self._nonfinite)
                epoch_end = self.batch_in_epoch >= len(batches)
                if epoch_end:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                finished = self.step >= self.total_steps
                if self.evaluator and ((cfg.eval_every and self.step % cfg.eval_every == 0) or epoch_end or finished):
                    self._flush_log()
                    self._evaluate()
                if (cfg.save_every and self.step % cfg.save_every == 0) or epoch_end or finished:
                    self._flush_log()
                    self.save_checkpoint()
                if finished or (cfg.exit_after_steps and self.step >= cfg.exit_after_steps):
                    stop = True
                    break
                if epoch_end:
                    break
        self._flush_log()
        if bar is not None:
            bar.close()
        if info.is_main and cfg.plot:
            from engine.fileio import disk_errors
            from engine.plotting import plot_metrics
            from engine.report import write_run_report

            with disk_errors(cfg.save_dir):
                plot_metrics(self.metrics_path, os.path.join(cfg.save_dir, "curves.png"))
                write_run_report(cfg.save_dir)
        distributed.barrier()
        return self._last

    def _flush_log(self) -> None:
        """Write the pending step's metrics line: the one place a step's numbers are read back."""
        record, self._pending = self._pending, None
        if record is None:
            return
        now = time.time()
        values = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        values["tokens_per_s"] = values.pop("n_tokens") / max(now - self._flushed_at, 1e-9)
        nonfinite_run = int(values.pop("nonfinite_run"))
        self._flushed_at, self._last = now, values
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

    def _weights_finite(self) -> bool:
        """Whether every weight of the model, on every rank, is finite."""
        bad = torch.zeros((), device=self.info.device)
        with torch.no_grad():
            for p in self.model.parameters():
                if not torch.isfinite(p).all():
                    bad.fill_(1.0)
                    break
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def _log(self, record: dict) -> None:
        from engine.fileio import disk_errors

        if self.info.is_main:
            with disk_errors(self.metrics_path), open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate(self) -> None:
        self.model.eval()
        result = self.evaluator(self.model)
        self.model.train()
        record = {"step": self.step, "epoch": self.epoch, "eval": True, **result}
        self._log(record)
        if self.info.is_main:
            print(f"\n[step {self.step}] eval accuracy {result['accuracy']:.4f} "
                  f"({result['correct']}/{result['total']}, unparsable {result['unparsable']})", flush=True)
        if result["accuracy"] > self.best_accuracy:
            if not self._weights_finite():  # never keep a NaN model as the best one
                if self.info.is_main:
                    print(f"warning: not saving best/ at step {self.step}: the weights hold NaN or Inf", flush=True)
                return
            self.best_accuracy = result["accuracy"]
            self._save_model_dir(os.path.join(self.cfg.save_dir, "best"), extra={"step": self.step, **result})

    # ----- saving -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _staged(self, final: str):
        """All ranks write into a temporary sibling of `final`; rank 0 swaps it in once all are done.
        A failed write (a full disk) removes the sibling and ends in one sentence naming `final`."""
        from engine.fileio import disk_errors

        stage, old = final.rstrip("/") + ".partial", final.rstrip("/") + ".old"
        with disk_errors(final):
            if self.info.is_main:
                shutil.rmtree(stage, ignore_errors=True)
                os.makedirs(stage)
            distributed.barrier()
            try:
                yield stage
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
        distributed.barrier()
        if self.info.is_main:
            if os.path.exists(final):
                os.replace(final, old)
            os.replace(stage, final)
            shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def _write_model_files(self, directory: str) -> None:
        """The model as a loadable checkpoint: LoRA adapter (+ base reference) or full native shards."""
        from engine.checkpoint import NATIVE_FORMAT, box_shape, shard_box, weight_specs
        from engine.fileio import SafetensorsWriter
        from engine.lora import save_lora

        info = self.info
        if info.dp_rank != 0:
            return
        if self.lora_cfg is not None:
            save_lora(self.model, self.lora_cfg, directory, self.base_ckpt)
        else:
            params = dict(self.model.named_parameters())
            specs = weight_specs(self.model.args)
            layout = [(sp.key, params[sp.key].dtype, box_shape(shard_box(sp, info.tp_rank, info.tp_size, self.model.args)))
                      for sp in specs]
            w = SafetensorsWriter(os.path.join(directory, f"consolidated.{info.tp_rank:02d}.safetensors"), layout,
                                  {"format": NATIVE_FORMAT, "rank": str(info.tp_rank), "world_size": str(info.tp_size)})
            for sp in specs:
                w.write(sp.key, params[sp.key].detach())
            w.close()
            if info.tp_rank == 0:
                self.model.args.save(os.path.join(directory, "params.json"))
        if info.is_main and self.tokenizer is not None:
            shutil.copyfile(self.tokenizer.path, os.path.join(directory, os.path.basename(self.tokenizer.path)))
        if info.is_main and self.template is not None:
            from engine.data import save_template

            save_template(directory, self.template)

    def _save_model_dir(self, final: str, extra: dict = None) -> None:
        with self._staged(final) as stage:
            self._write_model_files(stage)
            if extra and self.info.is_main:
                with open(os.path.join(stage, "eval.json"), "w") as f:
                    json.dump(extra, f)

    def save_checkpoint(self) -> None:
        final = os.path.join(self.cfg.save_dir, f"checkpoint-{self.step}")
        if not self._weights_finite():  # a NaN checkpoint would only replace good ones (keep_checkpoints)
            if self.info.is_main:
                print(f"warning: not saving {final}: the weights hold NaN or Inf", flush=True)
            return
        with self._staged(final) as stage:
            self._write_model_files(stage)
            state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "best_accuracy": self.best_accuracy, "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler else None,
                     "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
            if self.ds_engine is None:
                state["optimizer"] = self.optimizer.state_dict()
            atomic_torch_save(state, os.path.join(stage, f"trainer_state.{self.info.rank:02d}.pt"))
            if self.ds_engine is not None:
                self.ds_engine.save_checkpoint(os.path.join(stage, "deepspeed"), tag="state")
            if self.info.is_main:
                atomic_write_text(os.path.join(stage, "run.json"), json.dumps(self._run_signature(), indent=2))
        if self.info.is_main and self.cfg.keep_checkpoints > 0:
            for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def _checkpoints(self) -> List[str]:
        found = glob.glob(os.path.join(self.cfg.save_dir, "checkpoint-*"))
        found = [p for p in found if os.path.basename(p).split("-", 1)[1].isdigit()]
        return sorted(found, key=lambda p: int(os.path.basename(p).split("-", 1)[1]))

    def _run_signature(self) -> dict:
        return {"model_args": self.model.args.to_dict(), "tp_size": self.info.tp_size, "dp_size": self.info.dp_size,
                "lora": self.lora_cfg.to_dict() if self.lora_cfg else None, "seed": self.cfg.seed,
                "max_batch_size": self.cfg.max_batch_size, "deepspeed": self.ds_engine is not None}

    def _write_run_meta(self) -> None:
        if self.info.is_main:
            meta = {**self.run_meta, **self._run_signature(), "total_steps": self.total_steps,
                    "steps_per_epoch": self.steps_per_epoch}
            atomic_write_text(os.path.join(self.cfg.save_dir, "run_config.json"), json.dumps(meta, indent=2, default=str))

    def _check_fresh_start(self) -> None:
        if self._checkpoints():
            raise UserError(f"{self.cfg.save_dir} already holds checkpoints; pass --resume True to continue "
                            f"that run or choose another --save_dir")

    @staticmethod
    def _checkpoint_problem(path: str) -> Optional[str]:
        """Why `path` cannot be resumed from (a file it should hold is missing or unreadable), or None.
        Every rank checks every rank's files, so all of them pick the same checkpoint."""
        try:
            saved = json.load(open(os.path.join(path, "run.json")))
            tp, world, lora = saved["tp_size"], saved["tp_size"] * saved["dp_size"], saved["lora"]
        except FileNotFoundError:
            return "run.json is missing"
        except (OSError, ValueError, KeyError, TypeError):
            return "run.json is not readable"
        need = [f"trainer_state.{r:02d}.pt" for r in range(world)]
        need += (["lora_config.json"] + [f"lora.{r:02d}.safetensors" for r in range(tp)] if lora else
                 ["params.json"] + [f"consolidated.{r:02d}.safetensors" for r in range(tp)])
        if saved.get("deepspeed"):
            need.append("deepspeed")
        missing = [n for n in need if not os.path.exists(os.path.join(path, n))]
        return f"{missing[0]} is missing" if missing else None

    def _resume(self) -> None:
        from engine.checkpoint import load_state_into, open_checkpoint
        from engine.lora import open_lora

        ckpts = self._checkpoints()
        if not ckpts:
            raise UserError(f"--resume True but {self.cfg.save_dir} holds no checkpoint-N directory")
        skipped = []
        for path in reversed(ckpts):  # the newest intact checkpoint
            problem = self._checkpoint_problem(path)
            if problem is None:
                break
            skipped.append(f"{os.path.basename(path)} ({problem})")
        else:
            raise UserError(f"--resume True but no checkpoint in {self.cfg.save_dir} is intact: {'; '.join(skipped)}")
        if skipped and self.info.is_main:
            print(f"warning: skipping {', '.join(skipped)}; resuming from the previous intact checkpoint", flush=True)
        saved = json.load(open(os.path.join(path, "run.json")))
        mine = self._run_signature()
        for key, what in (("model_args", "a different model"), ("tp_size", "a different tensor-parallel size"),
                          ("dp_size", "a different data-parallel size"), ("lora", "different LoRA settings"),
                          ("max_batch_size", "a different --max_batch_size"), ("deepspeed", "a different --deepspeed use")):
            if saved.get(key) != mine.get(key):
                raise UserError(f"--resume: {path} was written by {what} ({key}: {saved.get(key)} vs {mine.get(key)})")
        info = self.info
        if self.lora_cfg is not None:
            src, _, _ = open_lora(path, self.model.args)
            load_state_into(self.model, src, info.tp_rank, info.tp_size, only_specs=True)
        else:
            load_state_into(self.model, open_checkpoint(path), info.tp_rank, info.tp_size)
        state_path = os.path.join(path, f"trainer_state.{info.rank:02d}.pt")
        try:
            state = torch.load(state_path, weights_only=False)
        except Exception as e:  # torch raises its own error types for a truncated file
            raise UserError(f"--resume: {state_path} is truncated or corrupted ({type(e).__name__}); remove "
                            f"{path} to resume from the checkpoint before it") from None
        if self.ds_engine is not None:
            self.ds_engine.load_checkpoint(os.path.join(path, "deepspeed"), tag="state",
                                           load_module_strict=False, load_lr_scheduler_states=False)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.best_accuracy = state["batch_in_epoch"], state["best_accuracy"]
        if info.is_main:  # drop log lines written after this checkpoint (and a line torn by the interruption)
            from engine.report import read_metric_lines

            kept = [r for r in read_metric_lines(self.metrics_path) if r["step"] <= self.step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            print(f"resumed from {path} at step {self.step}", flush=True)
