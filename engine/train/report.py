"""A small Markdown report per training run (save_dir/report.md) that embeds curves.png."""
from __future__ import annotations

import json
import os

from engine.runtime.fileio import atomic_write_text
from engine.runtime.log import read_metrics


def summarize_metrics(metrics_path: str) -> dict:
    steps, evals = read_metrics(metrics_path)
    evals = [e for e in evals if "accuracy" in e]  # an implicit-CoT emulator's state-error lines have none
    out = {"steps": steps[-1]["step"] if steps else 0, "evals": evals}
    if steps:
        tail = steps[-max(1, len(steps) // 10):]
        out.update(first_loss=steps[0]["loss"], final_loss=sum(r["loss"] for r in tail) / len(tail),
                   tokens_per_s=sum(r["tokens_per_s"] for r in tail) / len(tail))
        for k in ("loss_ce", "loss_kl"):
            if k in steps[-1]:
                out["final_" + k] = sum(r[k] for r in tail) / len(tail)
    if evals:
        out["first_accuracy"], out["final_accuracy"] = evals[0]["accuracy"], evals[-1]["accuracy"]
        out["best_accuracy"] = max(e["accuracy"] for e in evals)
    return out


def still_rising(evals: list, total_steps: int, margin: float = 0.02):
    """(earlier, last) evaluation records when accuracy was still climbing at the end of a run: the
    last evaluation beats the one closest to 90% of the steps by more than `margin`; else None."""
    if len(evals) < 2 or not total_steps:
        return None
    last = evals[-1]
    earlier = min(evals[:-1], key=lambda e: abs(e["step"] - 0.9 * total_steps))
    return (earlier, last) if last["accuracy"] - earlier["accuracy"] > margin else None


def rising_note(evals: list, total_steps: int) -> str:
    rising = still_rising(evals, total_steps)
    if not rising:
        return ""
    a, b = rising
    return (f"accuracy was still rising at the end ({a['accuracy']:.3f} at step {a['step']}, {b['accuracy']:.3f} "
            f"at step {b['step']}): more steps would likely raise it")


def write_run_report(save_dir: str) -> str:
    cfg_path = os.path.join(save_dir, "run_config.json")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    m = summarize_metrics(os.path.join(save_dir, "metrics.jsonl"))
    keys = ("launcher", "task", "train_file", "ckpt_dir", "model_type", "lora_rank", "tp_size", "dp_size",
            "max_batch_size", "lr", "epochs", "max_steps", "alpha", "temperature", "num_rationales", "seed")
    lines = [f"# Training run: {os.path.basename(os.path.abspath(save_dir))}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {cfg[k]} |" for k in keys if cfg.get(k) is not None]
    lines += ["", "| result | value |", "|---|---|", f"| optimizer steps | {m['steps']} |"]
    for k, label in (("first_loss", "loss at the first step"), ("final_loss", "loss at the end"),
                     ("final_loss_ce", "cross-entropy at the end"), ("final_loss_kl", "consistency KL at the end"),
                     ("tokens_per_s", "training tokens/s (end)")):
        if k in m:
            lines.append(f"| {label} | {m[k]:.4g} |")
    if m["evals"]:
        lines.append(f"| accuracy, first evaluation | {m['first_accuracy']:.3f} |")
        lines.append(f"| accuracy, last evaluation | {m['final_accuracy']:.3f} |")
        lines.append(f"| best accuracy (kept in best/) | {m['best_accuracy']:.3f} |")
        note = rising_note(m["evals"], cfg.get("total_steps") or m["steps"])
        if note:
            lines += ["", f"**Note:** {note}."]
    lines += ["", "![training curves](curves.png)", ""]
    path = os.path.join(save_dir, "report.md")
    atomic_write_text(path, "\n".join(lines))
    return path
