"""torchrun worker: run infer.generate for several jobs in one launch.  Usage: infer_worker.py JOBS.json"""
import json

import infer
from engine.runtime import distributed
from tests.workers import run


def main(jobs_file):
    distributed.setup(own=False)  # keep the process group across jobs
    for job in json.load(open(jobs_file)):
        infer.generate(**job)
    distributed.barrier()


if __name__ == "__main__":
    run(main)
