"""One job of a launcher, from process group to teardown: every command that runs a model goes through
`job(...)`, so the lock on its output, the release and the teardown are written once."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from engine.runtime import distributed
from engine.runtime.lock import own_output


@contextlib.contextmanager
def job(tp_size: Optional[int] = None, device: Optional[str] = None, lock_file: Optional[str] = None,
        what: str = "", make_dir: bool = False) -> Iterator[distributed.DistInfo]:
    """The process group (tensor x data parallel over torchrun's processes, or one process), and the
    output the job owns: rank 0 locks `lock_file` for the whole job (`what`: the flag naming the output in
    the sentence a second job gets; `make_dir`: create its directory). Yields the DistInfo. On success the
    ranks meet at a barrier before the group is torn down; on an error the lock is released and the error
    goes on (the other ranks are ended by torchrun)."""
    info = distributed.setup(tp_size, device)
    lock = own_output(lock_file, what, info, make_dir=make_dir) if lock_file else None
    try:
        yield info
    finally:
        if lock is not None:
            lock.release()
    distributed.barrier()
    distributed.teardown()
