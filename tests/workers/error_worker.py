"""torchrun worker: a user mistake seen by the ranks at different times (for the test that the error
sentence reaches the user whichever rank exits first).  Usage: error_worker.py --mode rank0_slow|rank1_only"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine.runtime import distributed  # noqa: E402
from engine.runtime.cli import run_cli  # noqa: E402
from engine.runtime.errors import UserError  # noqa: E402


def main(mode: str):
    """Fail as a launcher does on bad input.

    Args:
        mode: rank0_slow (every rank fails, rank 0 a moment later) or rank1_only (rank 0 waits in a barrier).
    """
    info = distributed.setup()
    if mode == "rank0_slow":
        if info.rank == 0:
            time.sleep(1.5)  # rank 1 reaches the mistake, and exits, first
        raise UserError(f"a mistake only {mode} makes")
    if info.rank == 1:
        raise UserError(f"a mistake only {mode} makes")
    distributed.barrier()


if __name__ == "__main__":
    run_cli(main)
