"""A job owns its output: an exclusive lock file that names its holder.

The lock is a `flock` on a small file holding the holder's pid, host, start time and command. The
kernel drops a flock when its holder exits, however it exits (exception, SIGTERM, SIGKILL), so a
lock file left behind by a dead process is free to take: it is stale, and the next job takes it
over and says whose it was. A live holder makes `acquire` fail at once with one sentence naming
the file and the holder. Works across processes on one machine and, for shared filesystems whose
client maps flock to POSIX locks (Linux NFS), across machines.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from engine.runtime.errors import UserError


class LockHeld(UserError):
    pass


def _holder_text(info: dict) -> str:
    if not info:
        return "another process"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, started {when})"


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        return {}


class OwnerLock:
    """lock = OwnerLock(path).acquire(what); ... lock.release() (also a context manager)."""

    def __init__(self, path: str):
        self.path = path
        self.fd: Optional[int] = None
        self.stale: dict = {}  # who held the lock file before us and died without releasing it

    def acquire(self, what: str, wrap_errors: bool = True) -> "OwnerLock":
        """Take the lock or raise LockHeld naming `what` (e.g. "--output_file out.jsonl") and the holder.
        An OS error creating the lock file is one sentence (or, with wrap_errors False, the OSError)."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                if not wrap_errors:
                    raise
                raise UserError(f"cannot create the lock file {self.path} for {what} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_info(fd)
                os.close(fd)
                raise LockHeld(f"{what} is in use by another job, {_holder_text(holder)}, which holds "
                               f"{self.path}; wait for it to finish or choose another output") from None
            # a releasing holder unlinks the file before closing it: make sure ours is still the one at path
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.stale = _read_info(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def stale_note(self) -> Optional[str]:
        if not self.stale:
            return None
        return f"note: took over {self.path}, left by {_holder_text(self.stale)}, which is no longer running"


def is_held(path: str) -> bool:
    """Whether a live process holds the lock file at `path` (a missing file is not held)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock we may have just taken
    return False
