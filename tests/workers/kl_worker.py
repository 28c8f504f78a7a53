"""torchrun worker: tests/kl_checks.teacher_kl_grads at the launch's tensor-parallel size; rank 0
saves the results.  Usage: kl_worker.py OUT.pt"""
import sys

import torch

from engine.runtime import distributed
from tests.kl_checks import teacher_kl_grads


def main(out):
    info = distributed.setup()
    result = teacher_kl_grads()
    if info.is_main:
        torch.save(result, out)
    distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
