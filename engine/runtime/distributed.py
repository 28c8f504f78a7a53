"""Process groups from torchrun's environment: tensor parallel (fairscale) x data parallel.

Ranks are laid out as fairscale does: consecutive ranks form one tensor-parallel group, so with
world size W and tensor-parallel size T there are W / T data-parallel replicas. A plain
`python script.py` (no torchrun) runs as a one-process world.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as mpu

from engine.runtime.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(tp_size: int | None = None, device: str | None = None, own: bool = True) -> DistInfo:
    """Initialise torch.distributed and fairscale's model-parallel groups (idempotent).

    tp_size: tensor-parallel size; default the whole world (pure tensor parallelism, as the seeds).
    device: "cuda" / "cpu" / None (see resolve_device). NCCL on CUDA, gloo on CPU.
    own: teardown() may destroy what this call creates (False for a long-lived host, e.g. tests).
    """
    device = resolve_device(device)
    if "RANK" not in os.environ:  # single process without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    tp_size = world if tp_size in (None, 0, -1) else int(tp_size)
    if tp_size < 1 or world % tp_size:
        raise UserError(f"--tp_size {tp_size} does not divide the {world} process(es) of this run; pass a divisor "
                        f"of {world} (or leave --tp_size out for {world}-way tensor parallelism)")

    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        if dev.type == "cuda":  # device_id: NCCL binds this rank's GPU now instead of guessing it later
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        if own:
            _OWNED.append(True)
    if not mpu.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
            mpu.initialize_model_parallel(tp_size)
    elif mpu.get_model_parallel_world_size() != tp_size:
        raise RuntimeError(f"model parallel already initialised with size {mpu.get_model_parallel_world_size()}")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank,
                    tp_rank=mpu.get_model_parallel_rank(), tp_size=tp_size,
                    dp_rank=mpu.get_data_parallel_rank(), dp_size=mpu.get_data_parallel_world_size(),
                    device=dev)


def resolve_device(requested: str | None) -> str:
    """The device of this process: --device cpu|cuda, or by default CUDA when every process on this
    node has a GPU of its own (CPU when the machine has none). A process group that already exists
    (a host that set one up, e.g. a test) decides: gloo means CPU."""
    if requested not in (None, "cpu", "cuda"):
        raise UserError(f"--device {requested!r} is not cpu or cuda")
    if requested is None and dist.is_initialized():
        return "cpu" if dist.get_backend() == "gloo" else "cuda"
    if requested == "cpu":
        return "cpu"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        if requested == "cuda":
            raise UserError("--device cuda but this machine shows no GPU; pass --device cpu to run on the CPU")
        return "cpu"
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if procs > gpus:
        raise UserError(f"{procs} processes on this node but only {gpus} GPU(s): start at most {gpus} per node "
                        f"(torchrun --nproc_per_node {gpus}), or pass --device cpu to run all {procs} on the CPU")
    return "cuda"


_OWNED: list = []  # set when setup() created the process group (a launcher's own run)


def teardown(always: bool = False) -> None:
    """Destroy what setup() created; a process group made by someone else (a test) is left alone
    unless `always` (the end of a process that keeps one group across several jobs: the group is
    destroyed in order rather than by the interpreter's exit, where gloo's threads may abort it)."""
    if not _OWNED and not always:
        return
    _OWNED.clear()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_group():
    return mpu.get_model_parallel_group()


def dp_group():
    return mpu.get_data_parallel_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor -> device without making the host wait for the device's queue (pinned, async)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
