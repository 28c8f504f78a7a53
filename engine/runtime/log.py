"""Run logs: metrics.jsonl lines read back (a line torn by a kill is dropped)."""
from __future__ import annotations

import json
import os


def read_metric_lines(metrics_path: str) -> list:
    """The records of metrics.jsonl ([] when absent). A line cut short by a killed run (only the last
    can be) is left out instead of making the file unreadable."""
    if not os.path.exists(metrics_path):
        return []
    out = []
    with open(metrics_path) as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "step" in rec:
                    out.append(rec)
    return out


def read_metrics(metrics_path: str):
    """metrics.jsonl -> (step records, evaluation records)."""
    steps, evals = [], []
    for rec in read_metric_lines(metrics_path):
        (evals if rec.get("eval") else steps).append(rec)
    return steps, evals
