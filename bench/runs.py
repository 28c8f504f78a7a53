"""What the experiment scripts share: running one of our launchers as a user would, and a mean with
its spread over seeds."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, env) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` from the repository root; a failure ends the experiment with its stderr."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc


def as_list(value, kind=str) -> list:
    """A comma-separated flag ("0,1,2") or the list fire already made of it, as a list of `kind`."""
    return [kind(v) for v in (str(value).split(",") if not isinstance(value, (list, tuple)) else value)]


def experiment_env(out: str, threads: str = "1") -> dict:
    """The environment every launcher of an experiment runs in (this checkout first on the path, one
    thread per process unless OMP_NUM_THREADS says otherwise); `out` made first."""
    os.makedirs(out, exist_ok=True)
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}


def mean_and_spread(values):
    """(mean, sample standard deviation; 0 for one value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
