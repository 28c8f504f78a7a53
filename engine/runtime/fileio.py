"""Crash-safe file writing: write to a temporary name in the same directory, fsync, rename.

Also a streaming safetensors writer, so a checkpoint of any size is written one tensor at a time
(memory: the largest single tensor, not the whole state dict). Every OS error while writing (a full
disk, a path that cannot be written) is one sentence naming the path and its flag, and a finished
file or directory gets the permissions of the user's umask (engine/runtime/outputs.py).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
from typing import Dict, Iterator, Sequence, Tuple

import torch

from engine.runtime.lock import OwnerLock, is_held
from engine.runtime.outputs import DiskFull, OutputError, output_errors, publish  # noqa: F401

# Any OS error while writing `path` (a full disk, no permission, a parent that is a file) ends in one
# sentence naming it and the flag of the output it belongs to, not a traceback.
disk_errors = output_errors


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: str) -> str:
    """The SHA-256 of a file, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator:
    """Open a temporary sibling of `path`; on success fsync it and rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    with disk_errors(path):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            publish(tmp)  # mkstemp made it private
            os.replace(tmp, path)
            _fsync_dir(directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


class _WriteErrors:
    """A file object that remembers the OSError of a failed write: torch.save turns it into a
    RuntimeError ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_torch_save(obj, path: str) -> None:
    with atomic_open(path, "wb") as f:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor. The layout (names, dtypes, shapes) is fixed up front,
    tensors must then be written in that order. The file appears under its final name only on close()."""

    def __init__(self, path: str, layout: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Dict[str, str] | None = None):
        header, offset = {}, 0
        self._order = []
        for name, dtype, shape in layout:
            nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape)))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned, as safetensors does
        self._ctx = atomic_open(path, "wb")
        self._f = self._ctx.__enter__()
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self._order[self._next]
        if name != exp_name or tensor.dtype != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise ValueError(f"safetensors writer expected {exp_name} {exp_dtype} {exp_shape}, "
                             f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            self.abort()
            raise ValueError(f"safetensors writer closed before writing {missing}")
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


STAGE_SUFFIX = ".partial"


@contextlib.contextmanager
def staged_directory(final_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Build an output directory under a temporary name and move it into place only when complete,
    so a failed conversion leaves nothing half-written behind. The temporary directory
    `.NAME.XXXX.partial` has a lock file beside it held while it is written; one whose writer died
    (killed, power lost) is removed by the next run that writes NAME."""
    final_dir = os.path.abspath(final_dir.rstrip("/"))
    parent = os.path.dirname(final_dir)
    with disk_errors(final_dir):
        os.makedirs(parent, exist_ok=True)
        remove_stale_stages(final_dir)
        stage = tempfile.mkdtemp(prefix="." + os.path.basename(final_dir) + ".", suffix=STAGE_SUFFIX, dir=parent)
        publish(stage, is_dir=True)  # mkdtemp made it private
        lock = OwnerLock(stage + ".lock").acquire(stage)
        try:
            yield stage
            if os.path.isdir(final_dir) and not os.listdir(final_dir):
                os.rmdir(final_dir)
            if os.path.exists(final_dir):
                if not overwrite:
                    raise OutputError(f"{final_dir} already exists; pass --overwrite True to replace it")
                trash = final_dir + ".old-" + os.path.basename(stage)
                os.replace(final_dir, trash)
                os.replace(stage, final_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(stage, final_dir)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        finally:
            lock.release()


def remove_stale_stages(final_dir: str) -> None:
    """Remove the `.NAME.XXXX.partial` directories of runs that died while writing `final_dir`: their
    lock file is no longer held. One without a lock file (an older version's) is only pointed out."""
    parent, name = os.path.dirname(final_dir), os.path.basename(final_dir)
    for stage in glob.glob(os.path.join(parent, glob.escape("." + name + ".") + "*" + STAGE_SUFFIX)):
        lock_path = stage + ".lock"
        if not os.path.exists(lock_path):
            print(f"note: {stage} looks like the leftover of an interrupted run (no lock file); remove it "
                  f"if no job is writing {final_dir}", flush=True)
        elif os.path.getsize(lock_path) and not is_held(lock_path):  # empty: its writer is starting
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(stage) for f in fs)
            shutil.rmtree(stage, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            print(f"removed {stage} ({size / 2 ** 20:.1f} MiB), the partial output of a run that died", flush=True)
