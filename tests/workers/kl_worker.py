"""torchrun worker: tests/kl_checks.teacher_kl_grads (or, with `authors`, authors_kl_results) at the
launch's tensor-parallel size; rank 0 saves the results.  Usage: kl_worker.py OUT.pt [authors]"""
import sys

import torch

from engine.runtime import distributed
from tests.kl_checks import authors_kl_results, teacher_kl_grads


def main(out, which="ours"):
    info = distributed.setup()
    result = authors_kl_results() if which == "authors" else teacher_kl_grads()
    if info.is_main:
        torch.save(result, out)
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
