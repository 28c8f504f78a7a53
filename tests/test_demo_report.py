"""The demo's report: it says when accuracy was still rising at the end, and CI's --min_accuracy
guard fails the run when the held-out accuracy falls below what the shortened demo reliably reaches."""
import json

import pytest

from engine.train.report import still_rising
from tests.helpers import run_cli


def _evals(pairs):
    return [{"step": s, "accuracy": a, "eval": True} for s, a in pairs]


def test_still_rising_compares_the_end_with_ninety_percent_of_the_run():
    assert still_rising(_evals([(0, 0.0), (2232, 0.45), (2480, 0.52), (2500, 0.52)]), 2500)  # the run
    assert not still_rising(_evals([(0, 0.0), (1600, 0.94), (2000, 0.995), (2200, 1.0), (2400, 1.0)]), 2400)
    assert not still_rising(_evals([(2400, 1.0)]), 2400)


def _fake_demo(out, evals, accuracy):
    (out / "run").mkdir(parents=True)
    lines = [{"step": s, "epoch": 0, "loss": 1.0 / (s + 1), "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0,
              "loss_ce": 1.0, "loss_kl": 0.0} for s in range(1, 2501)]
    lines += [{"step": s, "epoch": 0, "eval": True, "accuracy": a, "correct": int(200 * a), "total": 200,
               "unparsable": 0} for s, a in evals]
    (out / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(lines, key=lambda r: r["step"])))
    (out / "run" / "run_config.json").write_text(json.dumps({"total_steps": 2500}))
    summary = {"accuracy": accuracy, "correct": int(200 * accuracy), "total": 200, "unparsable": 0, "tokens_per_s": 1.0}
    (out / "predictions.jsonl.meta.json").write_text(json.dumps({"summary": summary}))


@pytest.mark.processes
def test_demo_report_notes_a_rising_curve_and_guards_a_minimum(tmp_path):
    _fake_demo(tmp_path / "rising", [(0, 0.0), (2232, 0.45), (2480, 0.52), (2500, 0.52)], 0.52)
    proc = run_cli("scripts/demo_report.py", "--out", str(tmp_path / "rising"), "--min_accuracy", "0.9")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: held-out accuracy 0.520 is below the expected minimum 0.9"
    report = (tmp_path / "rising" / "report.md").read_text()
    assert "accuracy was still rising at the end (0.450 at step 2232, 0.520 at step 2500)" in report
    _fake_demo(tmp_path / "flat", [(0, 0.0), (2000, 0.995), (2250, 1.0), (2500, 1.0)], 1.0)
    proc = run_cli("scripts/demo_report.py", "--out", str(tmp_path / "flat"), "--min_accuracy", "0.9")
    assert proc.returncode == 0, proc.stderr
    assert "still rising" not in (tmp_path / "flat" / "report.md").read_text()
