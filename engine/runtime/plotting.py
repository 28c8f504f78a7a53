"""Training curves from metrics.jsonl to a PNG: losses (each part), learning rate, grad norm, accuracy;
reliability diagrams of calibration."""
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
    fig, axes = plt.subplots(1, 4 if evals else 3, figsize=(16 if evals else 12, 3.6))
    for ax, (name, keys) in zip(axes, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in steps if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        if name == "loss":
            ax.set_yscale("log")
    if evals:
        ax = axes[3]
        metric = "accuracy" if "accuracy" in evals[0] else "mse"  # an implicit-CoT emulator is scored by its error
        ax.plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o")
        ax.set_title(f"eval {metric}")
        ax.set_xlabel("step")
        if metric == "accuracy":
            ax.set_ylim(0, 1)
    fig.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return png_path


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
