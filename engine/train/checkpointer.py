"""Saving and resuming a training run, beside the trainer (as torchtitan keeps one).

A save is staged: every rank writes into `NAME.partial`, rank 0 swaps it in once all are done, so a
crash never leaves a half-written checkpoint under the real name; a full disk ends in one sentence.
`checkpoint-N/` holds the model (native shards, or the LoRA adapter naming its base), the prompt
template and tokenizer, each rank's trainer state, and `run.json` (what must match to resume);
`best/` holds the model only. Both also hold the task's own files (Task.write_files) and, with a
template, the task's instruction prefixes. Resume takes the newest intact checkpoint, skipping damaged
ones. Weights holding NaN or Inf (the model's or the task's extra modules') are never saved.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist

from engine.checkpoint import load_state_into, open_checkpoint, open_lora, save_lora, write_model_shard
from engine.checkpoint.files import file_problem
from engine.runtime import distributed
from engine.runtime.errors import UserError
from engine.runtime.fileio import atomic_torch_save, atomic_write_text, disk_errors
from engine.runtime.log import read_metric_lines
from engine.runtime.outputs import args_inputs, dataclass_roles
from engine.runtime.signature import first_difference, input_identities
from engine.text.prompts import save_template
from engine.train.config import TrainConfig
from engine.train.task import Task

SCHEDULE_FLAGS = TrainConfig.SCHEDULE_FLAGS

# what a resumed run must share with the run that wrote the checkpoint (besides its run signature: the
# command, every flag that changes the result, the identity of every input; see run_signature)
SIGNATURE_CHECKS = (
    ("model_args", "a different model"),
    ("tp_size", "a different tensor-parallel size"),
    ("dp_size", "a different data-parallel size"),
    ("lora", "different LoRA settings"),
    ("max_batch_size", "a different --max_batch_size"),
    ("deepspeed", "a different --deepspeed use"),
)


def run_command(cfg) -> str:
    """The command a run was started with, as a user types it: `train.py --objective sft`,
    `train_mcc.py`, `train_implicit.py mind_read`."""
    launcher = getattr(cfg, "LAUNCHER", "")
    if getattr(cfg, "STAGE", ""):
        return f"{launcher} {cfg.STAGE}"
    if launcher == "train.py":
        return f"train.py --objective {getattr(cfg, 'OBJECTIVE', '')}"
    return launcher or type(cfg).__name__


def run_signature(cfg) -> dict:
    """What defines a training run, recorded in every checkpoint-N/run.json and compared on resume: the
    command, every flag that changes the result (all but cfg.RESUME_FREE; inputs by identity, not by
    path) and the identity of every input (data files by content, model directories by fingerprint)."""
    roles = dataclass_roles(cfg)
    flags = {
        name: getattr(cfg, name)
        for name, role in roles.items()
        if role != "input" and name not in cfg.RESUME_FREE and name != "save_dir"
    }
    inputs = args_inputs(cfg)
    return {
        "command": run_command(cfg),
        "flags": flags,
        "inputs": input_identities(inputs),
        "input_paths": {flag: os.path.abspath(p) for flag, p in inputs},  # for the sentences, not compared
    }


def check_same_run(saved: dict, current: dict, path: str, schedule_may_change: frozenset) -> None:
    """Refuse to resume `path` (whose run.json holds `saved`) in a run whose signature differs, with one
    sentence naming the command, flag or input; flags in `schedule_may_change` are let through."""
    if saved.get("command") != current["command"]:
        raise UserError(
            f"--resume: {path} was written by `{saved.get('command')}`, not `{current['command']}`; resume it "
            f"with `{saved.get('command')}`, or choose another --save_dir for this run"
        )
    old, new = saved.get("flags", {}), current["flags"]
    for name in [n for n in new if n in old and n not in schedule_may_change] + [n for n in old if n not in new]:
        if old.get(name) != new.get(name):
            hint = (
                ", or pass --reset_schedule True to rebuild the learning-rate schedule from the new value"
                if name in SCHEDULE_FLAGS
                else ""
            )
            raise UserError(
                f"--resume: {path} was written with --{name} {old.get(name)!r}, not {new.get(name)!r}; resume "
                f"with the flags the run started with{hint} (or choose another --save_dir for a new run)"
            )
    changed = first_difference(saved.get("inputs", {}), current["inputs"], current["inputs"])
    if changed:
        where = current.get("input_paths", {}).get(changed.split("#")[0], "")
        raise UserError(
            f"--resume: {changed} {where} is not what {path} was trained on (its content differs); resume "
            f"with the inputs the run started with, or choose another --save_dir for a new run"
        )


def precheck_resume(cfg) -> None:
    """With --resume True, compare the run signature with the newest intact checkpoint's before anything
    loads (rank 0; the resume itself checks again, on every rank, once the model is there)."""
    if not cfg.resume or int(os.environ.get("RANK", "0")) != 0:
        return
    for path in reversed(Checkpointer(cfg.save_dir, None, None).checkpoints()):
        if Checkpointer._problem(path) is None:
            saved = json.load(open(os.path.join(path, "run.json")))
            if "run" in saved:
                allowed = cfg.SCHEDULE_FLAGS if cfg.reset_schedule else frozenset()
                check_same_run(saved["run"], run_signature(cfg), path, allowed)
            return


class Checkpointer:
    """Saves and resumes the runs in save_dir. task: the objective trained (engine/train/task.py), whose
    extra modules are checked finite with the model, whose task_prefixes go into the template file and
    whose write_files adds its own files to every saved model directory."""

    def __init__(self, save_dir: str, model, info, lora_cfg=None, base_ckpt: Optional[str] = None, tokenizer=None,
                 template: Optional[str] = None, keep: int = 2, task: Optional[Task] = None):
        self.save_dir, self.model, self.info = save_dir, model, info
        self.lora_cfg, self.base_ckpt, self.tokenizer, self.template, self.keep = (lora_cfg, base_ckpt, tokenizer,
                                                                                   template, keep)
        self.task = task if task is not None else Task()

    # ----- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _staged(self, final: str):
        """All ranks write into a temporary sibling of `final`; rank 0 swaps it in once all are done.
        A failed write (a full disk) removes the sibling and ends in one sentence naming `final`."""
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
        """The model as a loadable checkpoint: LoRA adapter (+ base reference) or full native shards,
        then the task's own files; one data-parallel replica writes."""
        info = self.info
        if info.dp_rank != 0:
            return
        if self.lora_cfg is not None:
            save_lora(self.model, self.lora_cfg, directory, self.base_ckpt)
        else:
            write_model_shard(self.model, directory)
        if info.is_main and self.tokenizer is not None:
            shutil.copyfile(self.tokenizer.path, os.path.join(directory, os.path.basename(self.tokenizer.path)))
        if info.is_main and self.template is not None:
            save_template(directory, self.template, self.task.task_prefixes)
        self.task.write_files(directory)

    def checked_parameters(self):
        """The weights a save must find finite: the model's and the task's extra modules'."""
        return itertools.chain(self.model.parameters(), *(m.parameters() for m in self.task.extra_modules()))

    def weights_finite(self) -> bool:
        """Whether every checked weight, on every rank, is finite."""
        bad = torch.zeros((), device=self.info.device)
        with torch.no_grad():
            for p in self.checked_parameters():
                if not torch.isfinite(p).all():
                    bad.fill_(1.0)
                    break
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def save_model(self, name: str, extra: Optional[dict] = None) -> bool:
        """The model alone as save_dir/name (best/); False (and a warning) when it holds NaN or Inf."""
        final = os.path.join(self.save_dir, name)
        if not self.weights_finite():  # never keep a NaN model
            if self.info.is_main:
                print(f"warning: not saving {final}: the weights hold NaN or Inf", flush=True)
            return False
        with self._staged(final) as stage:
            self._write_model_files(stage)
            if extra and self.info.is_main:
                atomic_write_text(os.path.join(stage, "eval.json"), json.dumps(extra))
        return True

    def save(self, step: int, trainer_state: dict, signature: dict, ds_engine=None) -> None:
        """checkpoint-{step}: the model, this rank's trainer state, run.json; older ones beyond `keep`
        are removed (a NaN model is not saved: it would only push good checkpoints out)."""
        final = os.path.join(self.save_dir, f"checkpoint-{step}")
        if not self.weights_finite():
            if self.info.is_main:
                print(f"warning: not saving {final}: the weights hold NaN or Inf", flush=True)
            return
        with self._staged(final) as stage:
            self._write_model_files(stage)
            atomic_torch_save(trainer_state, os.path.join(stage, f"trainer_state.{self.info.rank:02d}.pt"))
            if ds_engine is not None:
                ds_engine.save_checkpoint(os.path.join(stage, "deepspeed"), tag="state")
            if self.info.is_main:
                atomic_write_text(os.path.join(stage, "run.json"), json.dumps(signature, indent=2))
        if self.info.is_main and self.keep > 0:
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    # ----- reading ------------------------------------------------------------------------------
    def checkpoints(self) -> List[str]:
        found = glob.glob(os.path.join(self.save_dir, "checkpoint-*"))
        found = [p for p in found if os.path.basename(p).split("-", 1)[1].isdigit()]
        return sorted(found, key=lambda p: int(os.path.basename(p).split("-", 1)[1]))

    def check_fresh_start(self) -> None:
        if self.checkpoints():
            raise UserError(f"{self.save_dir} already holds checkpoints; pass --resume True to continue "
                            f"that run or choose another --save_dir")

    @staticmethod
    def _problem(path: str) -> Optional[str]:
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
        if missing:
            return f"{missing[0]} is missing"
        damaged = (file_problem(os.path.join(path, n)) for n in need if n.endswith((".safetensors", ".pt")))
        return next((d for d in damaged if d), None)  # a file cut short by a kill or a full disk

    def resume(self, signature: dict, metrics_path: str, ds_engine=None, schedule_may_change=frozenset()):
        """Load the newest intact checkpoint into the model (and DeepSpeed); returns (path, this rank's
        trainer state). Metrics lines written after it (and a line torn by the interruption) are dropped."""
        ckpts = self.checkpoints()
        if not ckpts:
            raise UserError(f"--resume True but {self.save_dir} holds no checkpoint-N directory")
        skipped = []
        for path in reversed(ckpts):  # the newest intact checkpoint
            problem = self._problem(path)
            if problem is None:
                break
            skipped.append(f"{os.path.basename(path)} ({problem})")
        else:
            raise UserError(f"--resume True but no checkpoint in {self.save_dir} is intact: {'; '.join(skipped)}")
        if skipped and self.info.is_main:
            print(f"warning: skipping {', '.join(skipped)}; resuming from the previous intact checkpoint", flush=True)
        saved = json.load(open(os.path.join(path, "run.json")))
        if "run" in saved and "run" in signature:
            check_same_run(saved["run"], signature["run"], path, schedule_may_change)
        elif "run" in signature and self.info.is_main:
            print(f"note: {path} records no run signature (an older version wrote it): flags not compared", flush=True)
        for key, what in SIGNATURE_CHECKS:
            if saved.get(key) != signature.get(key):
                raise UserError(f"--resume: {path} was written by {what} ({key}: {saved.get(key)} vs {signature.get(key)})")
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
        if ds_engine is not None:
            ds_engine.load_checkpoint(os.path.join(path, "deepspeed"), tag="state", load_module_strict=False,
                                      load_lr_scheduler_states=False)
        if info.is_main:
            kept = [r for r in read_metric_lines(metrics_path) if r["step"] <= state["step"]]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            print(f"resumed from {path} at step {state['step']}", flush=True)
        return path, state
