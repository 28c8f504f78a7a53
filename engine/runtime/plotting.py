"""Training curves from metrics.jsonl to a PNG: losses (each part), learning rate, grad norm, accuracy, and
any other number an objective logs per step; reliability diagrams of calibration."""
from __future__ import annotations

import os

from engine.runtime.fileio import atomic_open
from engine.runtime.log import read_metrics


def plot_metrics(metrics_path: str, png_path: str, title: str = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = read_metrics(metrics_path)
    loss_keys = sorted({k for r in steps for k in r if k.startswith("loss") and k != "loss_scale"})
    panels = [("loss", loss_keys), ("learning rate", ["lr"]), ("grad norm", ["grad_norm"])]
    panels += [("eval", None)] * bool(evals) + _extra_panels(steps)  # evaluation 4th, an objective's own after
    cols = min(len(panels), 4)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax, (name, keys) in zip(axes.flat, panels):
        ax.set_xlabel("step")
        if keys is None:
            metric = "accuracy" if "accuracy" in evals[0] else "mse"  # an implicit-CoT emulator: its error
            ax.plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o")
            ax.set_title(f"eval {metric}")
            if metric == "accuracy":
                ax.set_ylim(0, 1)
            continue
        positive = True
        for k in keys:
            pts = [(r["step"], r[k]) for r in steps if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k, linewidth=1.2)
                positive = positive and min(v for _, v in pts) > 0
        ax.set_title(name)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        if name == "loss" and positive:  # a loss of exactly 0 (a teacher equal to the student) stays linear
            ax.set_yscale("log")
    fig.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return png_path


# the numbers of a step line the fixed panels plot, or that are not curves
_STANDARD = {"step", "epoch", "lr", "grad_norm", "tokens_per_s", "loss_scale", "skipped"}


def _extra_panels(steps) -> list:
    """A panel for each other number a step line carries (an objective's step_metrics): keys sharing
    the prefix before their first '_' share a panel (time_generation_s, time_teacher_s, ...)."""
    groups = {}
    for r in steps:
        for k, v in r.items():
            if k not in _STANDARD and not k.startswith("loss") and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                groups.setdefault(k.split("_")[0], set()).add(k)
    return [(next(iter(keys)) if len(keys) == 1 else prefix, sorted(keys)) for prefix, keys in groups.items()]


def plot_reliability(bins, ece: float, png_path: str, title: str = "") -> str:
    """Reliability diagram: accuracy per confidence bin (bars) against the diagonal of perfect
    calibration, with the examples per bin beneath. Each bin spans its lo..hi (equal-mass bins: their
    lowest to highest confidence, drawn at least 1/100 wide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [b for b in bins if b["count"]]
    width = [max(b["hi"] - b["lo"], 0.01) for b in filled]
    top.bar(
        [b["lo"] for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    top.bar(
        [b["lo"] for b in filled],
        [b["confidence"] for b in filled],
        width=width,
        align="edge",
        fill=False,
        edgecolor="tab:red",
        hatch="//",
        label="mean confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE {ece:.4f}".strip())
    top.legend(fontsize=8, loc="upper left")
    bottom.bar([b["lo"] for b in filled], [b["count"] for b in filled], width=width, align="edge", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence of the first answer token")
    bottom.set_ylabel("examples")
    fig.tight_layout()
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return png_path
