"""Print the demo's short report and write demo_out/report.md (embedding the training curves)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(out: str = "demo_out", wall_s: float = 0.0, min_accuracy: float = 0.0):
    """Print the report and write OUT/report.md.

    Args:
        out: the demo's output directory.
        wall_s: the demo's wall time in seconds, for the report.
        min_accuracy: exit non-zero when the held-out accuracy is below it (CI's guard on what the shortened demo reliably reaches).
    """
    from engine.runtime.fileio import atomic_write_text
    from engine.train.report import rising_note, summarize_metrics

    run = os.path.join(out, "run")
    m = summarize_metrics(os.path.join(run, "metrics.jsonl"))
    infer_meta = json.load(open(os.path.join(out, "predictions.jsonl.meta.json")))["summary"]
    before = m["evals"][0]
    rows = [
        ("accuracy before training", f"{before['accuracy']:.1%} ({before['correct']}/{before['total']})"),
        ("accuracy after (infer.py, held-out)", f"{infer_meta['accuracy']:.1%} ({infer_meta['correct']}/"
                                                f"{infer_meta['total']}, unparsable {infer_meta['unparsable']})"),
        ("training steps", str(m["steps"])),
        ("training tokens/s (TP=2, CPU)", f"{m['tokens_per_s']:.0f}"),
        ("generation tokens/s (TP=2, CPU)", f"{infer_meta['tokens_per_s']:.0f}"),
        ("loss: cross-entropy / consistency KL at the end",
         f"{m.get('final_loss_ce', float('nan')):.4f} / {m.get('final_loss_kl', float('nan')):.2e}"),
        ("wall time", f"{wall_s:.0f} s"),
    ]
    paths = [("best checkpoint (2 tensor-parallel shards)", os.path.join(run, "best")),
             ("predictions", os.path.join(out, "predictions.jsonl")),
             ("metrics", os.path.join(run, "metrics.jsonl")), ("curves", os.path.join(run, "curves.png")),
             ("run report", os.path.join(run, "report.md")), ("this report", os.path.join(out, "report.md"))]
    width = max(len(k) for k, _ in rows + paths)
    print("\n=== MCC-KD demo: a tiny student distilled from multi-rationale arithmetic ===")
    for k, v in rows + paths:
        print(f"  {k:<{width}}  {v}")
    md = ["# MCC-KD demo report", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    run_cfg = json.load(open(os.path.join(run, "run_config.json")))
    note = rising_note(m["evals"], run_cfg["total_steps"])
    if note:
        print(f"  note: {note}")
        md += ["", f"**Note:** {note}."]
    md += ["", "![training curves](run/curves.png)", "", "Files:", ""] + [f"- {k}: `{v}`" for k, v in paths]
    atomic_write_text(os.path.join(out, "report.md"), "\n".join(md) + "\n")
    if infer_meta["accuracy"] < min_accuracy:
        print(f"error: held-out accuracy {infer_meta['accuracy']:.3f} is below the expected minimum {min_accuracy}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
