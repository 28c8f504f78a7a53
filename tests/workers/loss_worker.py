"""torchrun worker: tests/model_checks.head_loss_grads at the launch's tensor-parallel size; rank 0
saves the results.  Usage: loss_worker.py OUT.pt"""

import torch

from engine.runtime import distributed
from tests.model_checks import head_loss_grads
from tests.workers import run


def main(out):
    info = distributed.setup()
    result = head_loss_grads()
    if info.is_main:
        torch.save(result, out)
    distributed.barrier()


if __name__ == "__main__":
    run(main)
