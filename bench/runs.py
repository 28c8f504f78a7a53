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


def mean_and_spread(values):
    """(mean, sample standard deviation; 0 for one value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
