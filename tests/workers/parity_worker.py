"""torchrun worker: load each job's checkpoint at the launch's tensor-parallel size, run the model,
and (rank 0) save full and cached logits.  Usage: parity_worker.py JOBS.json"""
import json

import torch

from engine.checkpoint import load_model
from engine.runtime import distributed
from tests.model_checks import full_logits, ragged_cached_logits
from tests.workers import run


def main(jobs_file):
    info = distributed.setup()
    torch.set_num_threads(1)
    for job in json.load(open(jobs_file)):
        model = load_model(job["ckpt"]).eval()
        tokens = torch.load(job["tokens"])
        result = {"full": full_logits(model, tokens),
                  "cached": ragged_cached_logits(model, tokens, job["prompt_lens"])}
        if info.is_main:
            torch.save(result, job["out"])
    distributed.barrier()


if __name__ == "__main__":
    run(main)
