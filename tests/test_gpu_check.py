"""bench/gpu_check.py, the first run on a bare GPU machine, run here on the CPU with tiny sizes: it
writes a JSON line per result as it comes and a summary, every section runs, and its budget holds
(a section that does not fit is skipped, one that overruns is cut and the run still ends cleanly)."""
import importlib
import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, child_env


@pytest.mark.processes
def test_cpu_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "out"
    env = child_env(PYTHONUNBUFFERED="1")  # not the test process's torch.distributed variables: its own world
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--tiny",
                           "True", "--out_dir", str(out), "--budget_s", "300"], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=600)
    lines = [json.loads(line) for line in open(out / "gpu_check.jsonl")] if (out / "gpu_check.jsonl").exists() else []
    errors = [r for r in lines if r["status"] == "error"]
    assert proc.returncode == 0, (errors, proc.stdout[-2000:], proc.stderr[-2000:])
    summary = json.load(open(out / "gpu_check.json"))
    assert summary["status"] == "complete" and summary["failed"] == [], summary
    order = list(dict.fromkeys(r["section"] for r in lines))
    assert order == ["env", "bandwidth", "decode", "fused", "tokens", "train", "hf", "moe"]
    sections = summary["sections"]
    assert all(sections[name]["status"] == "ok" for name in order), {n: sections[n]["status"] for n in order}
    assert not [r for r in lines if r["status"] in ("error", "skipped", "out_of_time")]

    assert sections["env"]["fused_unscale_op"] and sections["env"]["fairscale"]
    assert sections["bandwidth"]["read_gb_s"] > 0 and sections["bandwidth"]["matmul_tflop_s"] > 0
    runner = sections["decode"]["parts"]["runner"]
    assert runner["tokens"] == 8 and runner["e2e_tokens_per_s"] > 0 and runner["description"]
    assert sections["decode"]["parts"]["plain_forward"]["eager_ms"] > 0
    fused = sections["fused"]["parts"]
    assert fused["kernel_vs_twin"]["worst_rel_err"] < 1e-5 and fused["tokens"]["all_identical"]
    assert fused["batch_1"]["same_tokens_as_dense"] and fused["batch_1"]["tokens"] == 8
    assert all(fused[f"attention_{n}"]["fused_ms"] > 0 and fused[f"attention_{n}"]["dense_ms"] > 0 for n in (8, 64))
    for name in ("greedy", "sampled"):
        tokens = sections["tokens"]["parts"][name]
        assert tokens["all_identical"] and tokens["identical"] == "6/6", tokens
    assert sections["tokens"]["parts"]["greedy"]["stopped_early"] > 0  # the stop id made rows end unevenly
    shared = sections["tokens"]["parts"]["shared_prompts"]
    assert shared["identical"] == "12/12" and shared["segment"], shared
    train = sections["train"]
    assert train["tokens_per_s"] > 0 and train["graph_breaks"] == 0
    assert len(set(train["widths"])) > 1  # every step another shape, the first two different
    hf = sections["hf"]["parts"]
    assert set(hf) == {"batch_1", "batch_8"}
    assert all(r["ours_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 and r["ratio"] > 0 for r in hf.values())
    moe = sections["moe"]["parts"]
    assert moe["tokens_greedy"]["all_identical"] and moe["tokens_sampled"]["identical"] == "3/3", moe
    assert moe["batch_1_fused"]["same_tokens_as_dense"] and moe["batch_1_dense"]["tokens"] == 8
    assert 0 < moe["batch_1_fused"]["needed_gb"] < moe["batch_1_fused"]["weight_gb"]
    routes = moe["batch_6_routes"]  # the static MoE by grouped matmuls, and every expert on every row
    assert routes["grouped_route_available"] and routes["grouped_vs_loop_rel_err"] < 1e-5, routes
    assert routes["grouped_eager_ms"] > 0 and routes["dense_eager_ms"] > 0
    assert "gpu_check: complete" in proc.stdout


def test_budget_skips_what_does_not_fit_and_cuts_what_overruns(tmp_path, monkeypatch, dist1):
    check = importlib.import_module("bench.gpu_check")

    monkeypatch.setitem(check.ESTIMATE, "decode", (10 ** 6, 10 ** 6))  # never fits

    def stuck(c, report):
        report.line("bandwidth", "running", part="started")
        time.sleep(60)

    monkeypatch.setitem(check.RUN, "bandwidth", stuck)
    start = time.perf_counter()
    check.main(out_dir=str(tmp_path), budget_s=3, device="cpu", tiny=True, sections="env,decode,bandwidth,tokens")
    assert time.perf_counter() - start < 30
    summary = json.load(open(tmp_path / "gpu_check.json"))
    lines = [json.loads(line) for line in open(tmp_path / "gpu_check.jsonl")]
    assert summary["status"] == "out of time in bandwidth"
    assert summary["sections"]["env"]["status"] == "ok"
    assert summary["sections"]["decode"]["status"] == "skipped"
    assert summary["sections"]["bandwidth"]["status"] == "out_of_time"
    assert "tokens" not in summary["sections"]  # nothing runs after the budget is spent
    assert [r["section"] for r in lines] == ["env", "decode", "bandwidth", "bandwidth"]
