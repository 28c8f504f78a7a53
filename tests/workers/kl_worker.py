"""torchrun worker: tests/kl_checks.teacher_kl_grads (or, with `authors`, authors_kl_results; with
`divergences`, divergence_grads) at the launch's tensor-parallel size; rank 0 saves the results.
Usage: kl_worker.py OUT.pt [authors|divergences]"""

import torch

from engine.runtime import distributed
from tests.kl_checks import authors_kl_results, divergence_grads, teacher_kl_grads
from tests.workers import run


def main(out, which="ours"):
    info = distributed.setup()
    result = {"authors": authors_kl_results, "divergences": divergence_grads}.get(which, teacher_kl_grads)()
    if info.is_main:
        torch.save(result, out)
    distributed.barrier()


if __name__ == "__main__":
    run(main)
