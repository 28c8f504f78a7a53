"""One job of a launcher, from process group to teardown: every command that runs a model goes through
`job(...)`, so the guard on its outputs (engine/runtime/outputs.py), the lock, the release and the
teardown are written once."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Tuple

from engine.runtime import distributed
from engine.runtime.errors import UserError
from engine.runtime.outputs import Output, OutputError, check_before_loading, check_existing, release, take_locks


def _legacy_output(lock_file: Optional[str], what: str, make_dir: bool) -> list:
    """The Output a caller of the older job(lock_file=..., what="--flag PATH") signature names."""
    if not lock_file:
        return []
    flag, _, path = what.partition(" ")
    return [Output(flag or "--output", path or lock_file, is_dir=make_dir, lock=lock_file)]


def _own_outputs(outputs, overwrite: bool, continues, info) -> list:
    """Rank 0 locks every output and refuses an existing one it may not replace; every rank learns the
    outcome, so all of them stop with the same sentence. Returns rank 0's locks ([] elsewhere)."""
    import atexit

    locks, error = [], None
    if info.is_main:
        try:
            locks = take_locks(outputs)
            for lock in locks:
                atexit.register(lock.release)  # also released by a process that dies
            for out in outputs:
                check_existing(out, overwrite, continues)
        except UserError as e:  # an output refused, or held by another job
            release(locks)
            locks, error = [], str(e)
    if info.world_size > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise OutputError(error)
    return locks


@contextlib.contextmanager
def job(
    tp_size: Optional[int] = None,
    device: Optional[str] = None,
    lock_file: Optional[str] = None,
    what: str = "",
    make_dir: bool = False,
    *,
    outputs: Sequence[Output] = (),
    inputs: Sequence[Tuple[str, str]] = (),
    overwrite: bool = False,
    continues: Optional[Callable[[str], bool]] = None,
) -> Iterator[distributed.DistInfo]:
    """The process group (tensor x data parallel over torchrun's processes, or one process), and the
    outputs the job owns. Before the group forms, every rank refuses an output that is, is inside or
    holds one of `inputs` ((flag, path) pairs) and an impossible path; then rank 0 locks each output for
    the whole job and refuses an existing one unless `overwrite` (or `continues(path)`: the command
    continues it). (`lock_file` / `what` / `make_dir`: one output named the older way.) Yields the
    DistInfo. On success the ranks meet at a barrier before the group is torn down; on an error the
    locks are released and the error goes on (the other ranks are ended by torchrun)."""
    outputs = [o for o in (*outputs, *_legacy_output(lock_file, what, make_dir)) if o.path]
    check_before_loading(outputs, inputs)
    info = distributed.setup(tp_size, device)
    locks = _own_outputs(outputs, overwrite, continues, info)
    try:
        yield info
    finally:
        release(locks)
    distributed.barrier()
    distributed.teardown()
