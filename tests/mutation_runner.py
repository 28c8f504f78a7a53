"""Break the code on purpose, one breakage at a time, and check that a test fails (the developers'
guide: tests must be able to fail). Each tests/mutations_*.py script lists its breakages and calls
`main`:

  .venv/bin/python tests/mutations_NAME.py [--only SUBSTRING,...] [--list] [--control]

A breakage replaces code that must occur exactly once, in a scratch copy of the tree (the files git
tracks, as they are in the working tree, with .venv linked and ../shared beside it), runs the tests
named for it (pytest node ids) and prints `caught` with the test that failed, or `SURVIVED` (a script
may count only failed assertions as caught, not crashes: `main(..., assertions_only=True)`).
`--control` first runs every named test on the unbroken copy (all must pass). The working tree is
never modified. Exits 1 when a breakage survives or the control fails."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normalised(mutation: tuple) -> tuple:
    """(name, [(file, old, new), ...], tests) from either that or (name, file, old, new, tests)."""
    if len(mutation) == 5:
        name, path, old, new, tests = mutation
        return name, [(path, old, new)], list(tests)
    name, edits, tests = mutation
    return name, list(edits), list(tests)


def scratch_copy(parent: str) -> str:
    """The tracked files of the working tree under parent/repo, .venv linked, ../shared beside it."""
    repo = os.path.join(parent, "repo")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(repo, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(repo, rel))
    os.symlink(os.path.realpath(os.path.join(ROOT, ".venv")), os.path.join(repo, ".venv"))
    shared = os.path.join(os.path.dirname(ROOT), "shared")
    if os.path.exists(shared):
        os.symlink(shared, os.path.join(parent, "shared"))
    return repo


def run_tests(repo: str, tests, assertions_only: bool = False) -> tuple:
    """(passed, the first failing test or the output's last line); with assertions_only, a run that
    fails other than on an assertion (an import error, a crash) counts as passed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "1000"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=repo,
                          capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines() or [proc.stderr.strip()[-200:]]
    summary = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    failed = [ln.split(" ")[1] for ln in summary]
    if assertions_only and not (summary and all(" - AssertionError" in ln or " - assert" in ln for ln in summary)):
        return True, "no assertion failed" + (f" ({summary[0][:160]})" if summary else "")
    return proc.returncode == 0, (failed[0].removeprefix("tests/") if failed else lines[-1])


def break_and_test(repo: str, mutation: tuple, assertions_only: bool = False) -> bool:
    """Apply one breakage, run its tests, undo it; True when a test failed."""
    name, edits, tests = mutation
    originals = {}
    try:
        for path, old, new in edits:
            full = os.path.join(repo, path)
            text = open(full).read()  # a second breakage of one file builds on the first
            originals.setdefault(full, text)
            if text.count(old) != 1:
                raise SystemExit(f"breakage {name!r}: the code to break occurs {text.count(old)} times in {path}, "
                                 f"not once: {old!r}")
            with open(full, "w") as f:
                f.write(text.replace(old, new))
        t0 = time.time()
        passed, detail = run_tests(repo, tests, assertions_only)
    finally:
        for full, text in originals.items():
            with open(full, "w") as f:
                f.write(text)
    print(f"{'SURVIVED' if passed else 'caught  '} {name}  <- {detail} ({time.time() - t0:.0f} s)", flush=True)
    return not passed


def main(mutations, argv=None, assertions_only: bool = False) -> int:
    parser = argparse.ArgumentParser(description="Break the code on purpose and check that a test fails.")
    parser.add_argument("--only", default="", help="comma-separated substrings of the breakages' names to run")
    parser.add_argument("--list", action="store_true", help="print the breakages' names and stop")
    parser.add_argument("--control", action="store_true", help="first run every named test on the unbroken tree")
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    chosen = [normalised(m) for m in mutations]
    chosen = [m for m in chosen if not wanted or any(w in m[0] for w in wanted)]
    if args.list:
        print("\n".join(m[0] for m in chosen))
        return 0
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        repo = scratch_copy(tmp)
        if args.control:
            passed, detail = run_tests(repo, sorted({t for m in chosen for t in m[2]}))
            print(f"control: {'passed' if passed else 'FAILED'}; {detail}", flush=True)
            if not passed:
                return 1
        caught = sum(break_and_test(repo, m, assertions_only) for m in chosen)
    print(f"{caught}/{len(chosen)} breakages caught")
    return 0 if caught == len(chosen) else 1
