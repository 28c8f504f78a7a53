"""torchrun worker: a user mistake seen by the ranks at different times (for the test that the error
sentence reaches the user once, whichever rank exits first and however slowly the others die).
Usage: error_worker.py --mode rank0_slow|rank1_only|slow_to_die"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine.runtime import distributed  # noqa: E402
from engine.runtime.cli import run_cli  # noqa: E402
from engine.runtime.errors import UserError  # noqa: E402


def main(mode: str):
    """Fail as a launcher does on bad input.

    Args:
        mode: rank0_slow (every rank fails, rank 0 a moment later), rank1_only (rank 0 waits in a barrier), or slow_to_die (every rank fails at once and rank 1 outlives torchrun's SIGTERM, as a rank busy in a long kernel on a loaded machine does).
    """
    info = distributed.setup()
    if mode == "slow_to_die":
        if info.rank == 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        distributed.barrier()
        raise UserError(f"a mistake only {mode} makes")
    if mode == "rank0_slow":
        if info.rank == 0:
            time.sleep(1.5)  # rank 1 reaches the mistake, and exits, first
        raise UserError(f"a mistake only {mode} makes")
    if info.rank == 1:
        raise UserError(f"a mistake only {mode} makes")
    distributed.barrier()


if __name__ == "__main__":
    run_cli(main)
