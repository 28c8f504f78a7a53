"""Shared launcher plumbing: fire, strict flags, and one-sentence errors for user mistakes."""
from __future__ import annotations

import inspect
import os
import sys

from engine.errors import UserError


def fail(message: str, code: int = 2) -> None:
    """Print one error sentence (rank 0 only under torchrun) and exit non-zero."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def unknown_flags(component, argv) -> list:
    """Flags in argv that the called function does not take (fire would run the job first and
    complain only afterwards)."""
    fn, args = component, list(argv)
    if isinstance(component, dict):
        if not args or args[0] not in component:
            return []
        fn, args = component[args[0]], args[1:]
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    bad = []
    for a in args:
        if a == "--":
            break
        if a.startswith("--") and len(a) > 2:
            name = a[2:].split("=", 1)[0].replace("-", "_")
            if name not in params and name not in ("help", "helpfull", "trace", "verbose", "interactive", "completion"):
                bad.append("--" + name)
    return bad


def run_cli(component) -> None:
    import fire

    bad = unknown_flags(component, sys.argv[1:])
    if bad:
        fail(f"unknown flag {', '.join(bad)}; see --help for the flags this command takes")
    try:
        fire.Fire(component)
    except UserError as e:
        fail(str(e))
