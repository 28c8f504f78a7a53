"""Shared launcher plumbing: fire, and one-sentence errors for user mistakes."""
from __future__ import annotations

import os
import sys

from engine.errors import UserError


def fail(message: str, code: int = 2) -> None:
    """Print one error sentence (rank 0 only under torchrun) and exit non-zero."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_cli(component) -> None:
    import fire

    try:
        fire.Fire(component)
    except UserError as e:
        fail(str(e))
