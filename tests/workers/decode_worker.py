"""torchrun worker: every decode path (tests/model_checks.decode_paths) for each job's HF
checkpoint at the launch's tensor-parallel size; rank 0 writes the tokens.  Usage: decode_worker.py JOBS.json"""
import json

import torch

from engine.checkpoint import load_for_inference
from engine.runtime import distributed
from tests.model_checks import decode_paths
from tests.workers import run


def main(jobs_file):
    info = distributed.setup()
    torch.set_num_threads(1)
    for job in json.load(open(jobs_file)):
        model = load_for_inference(job["ckpt"], None, torch.float32, "cpu")[0].eval()  # fused, as infer.py
        result = decode_paths(model, job["prompts"], job["stop_ids"], job["new_tokens"])
        if info.is_main:
            json.dump(result, open(job["out"], "w"))
    distributed.barrier()


if __name__ == "__main__":
    run(main)
