"""Where a training run's numbers go besides metrics.jsonl: TensorBoard and Weights & Biases (optional
extras, off by default, each imported only when --log_to names it), and samples.jsonl, the texts a
few evaluation records got at each evaluation (so a user sees what the student writes)."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
from typing import List, Optional

from engine.runtime.errors import UserError
from engine.runtime.fileio import atomic_write_text, disk_errors

LOGGERS = {"tensorboard": ("tensorboard", "tensorboard==2.21.0"), "wandb": ("wandb", "wandb==0.31.0")}
WANDB_MODES = ("online", "offline", "disabled")
SAMPLES_FILE = "samples.jsonl"
SAMPLE_FIELDS = ("index", "instruction", "output", "prediction", "label", "correct")


def parse_loggers(log_to: Optional[str], wandb_mode: Optional[str] = None) -> tuple:
    """The loggers --log_to names (comma separated), each checked to be known and installed."""
    names = tuple(n for n in (log_to or "").replace(" ", "").split(",") if n and n != "none")
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"--log_to {name!r} is not one of {', '.join(LOGGERS)} (or none)")
        module, pinned = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--log_to {name} needs the {module} package: pip install {pinned} (or pip install "
                            f"'cot-distill-engine[{name}]')")
    if wandb_mode is not None and wandb_mode not in WANDB_MODES:
        raise UserError(f"--wandb_mode {wandb_mode!r} is not one of {', '.join(WANDB_MODES)}")
    return names


def _scalars(record: dict) -> dict:
    """The numbers of a metrics line under TensorBoard / W&B names: train/loss, eval/accuracy, ..."""
    kind = "eval" if record.get("eval") else "train"
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "eval") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def samples_markdown(samples: List[dict]) -> str:
    """The samples as a markdown table (TensorBoard's text tab renders it)."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", "<br>")

    rows = ["| " + " | ".join(SAMPLE_FIELDS) + " |", "|" + "---|" * len(SAMPLE_FIELDS)]
    rows += ["| " + " | ".join(cell(s.get(k)) for k in SAMPLE_FIELDS) + " |" for s in samples]
    return "\n".join(rows)


class RunLoggers:
    """The sinks of one run on the main rank (a run without --log_to has none and writes only
    samples.jsonl); every other rank gets one that does nothing. resume_step: the step a resumed run
    continues from (samples.jsonl keeps the lines up to it; a fresh run, None, starts it empty)."""

    def __init__(self, save_dir: str, names=(), active: bool = True, run_name: Optional[str] = None,
                 config: Optional[dict] = None, project: str = "cot-distill-engine", wandb_mode: Optional[str] = None,
                 resume_step: Optional[int] = None):
        self.save_dir, self.active, self.tb, self.wandb = save_dir, active, None, None
        if not active:
            return
        _keep_samples_up_to(os.path.join(save_dir, SAMPLES_FILE), resume_step)
        run_name = run_name or os.path.basename(os.path.abspath(save_dir))
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(save_dir, "tensorboard"))
        if "wandb" in names:
            self.wandb = _start_wandb(save_dir, run_name, config or {}, project, wandb_mode, resume_step is not None)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        step, scalars = int(record["step"]), _scalars(record)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_samples(self, step: int, samples: List[dict]) -> None:
        """samples.jsonl (one line per sample, with its step) and the loggers' text / table views."""
        if not self.active or not samples:
            return
        path = os.path.join(self.save_dir, SAMPLES_FILE)
        with disk_errors(path), open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n" for s in samples)
        if self.tb is not None:
            self.tb.add_text("eval/samples", samples_markdown(samples), step)
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=list(SAMPLE_FIELDS), data=[[str(s.get(k)) for k in SAMPLE_FIELDS]
                                                                   for s in samples])
            self.wandb.log({"eval/samples": table}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None


def _keep_samples_up_to(path: str, step: Optional[int]) -> None:
    """samples.jsonl as a run resumed at `step` left it (None: a fresh run, no samples yet)."""
    if not os.path.exists(path):
        return
    kept = []
    if step is not None:
        for line in open(path, encoding="utf-8"):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a line torn by a kill ends what can be read
    with disk_errors(path):
        atomic_write_text(path, "".join(kept))


def _start_wandb(save_dir: str, run_name: str, config: dict, project: str, mode: Optional[str], resume: bool):
    """A W&B run in save_dir/wandb; its id is kept in save_dir/wandb_run_id so --resume continues it."""
    import wandb

    id_file = os.path.join(save_dir, "wandb_run_id")
    run_id = open(id_file).read().strip() if resume and os.path.exists(id_file) else secrets.token_hex(4)
    try:
        run = wandb.init(project=project, name=run_name, id=run_id, dir=save_dir, mode=mode, resume="allow",
                         config=json.loads(json.dumps(config, default=str)))
    except Exception as e:  # wandb raises its own types for a missing login, a bad mode, no network
        raise UserError(f"--log_to wandb: W&B did not start ({' '.join(str(e).split())[:200]}); run `wandb "
                        f"login`, or pass --wandb_mode offline") from None
    atomic_write_text(id_file, run_id + "\n")
    return run
