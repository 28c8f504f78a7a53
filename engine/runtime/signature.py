"""A run's signature: what defines the run, recorded with what it writes and compared when it is
resumed, so that a resumed run is the same run (training's checkpoint-N/run.json, a generation
file's OUTPUT.meta.json).

It holds the command (launcher and objective), every flag that changes the result, and the identity of
every input: the SHA-256 of a data file's content, and a fingerprint of a model directory (every file's
name, size and SHA-256; files over 64 MiB by their first MiB and 16 evenly spaced 1 MiB blocks, so a
70B checkpoint is fingerprinted in seconds while any retraining, which rewrites every tensor, shows).
Paths themselves are not compared: a data file or checkpoint moved elsewhere is the same input.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

SAMPLED_ABOVE = 64 << 20
BLOCK = 1 << 20
BLOCKS = 16


def _file_digest(path: str, sampled: bool) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if not sampled or size <= SAMPLED_ABOVE:
            for block in iter(lambda: f.read(BLOCK), b""):
                h.update(block)
        else:
            for k in range(BLOCKS + 1):  # the header, then blocks spread up to the end
                f.seek(0 if k == 0 else (size - BLOCK) * k // BLOCKS)
                h.update(f.read(BLOCK))
    h.update(str(size).encode())
    return h.hexdigest()


def _files(directory: str) -> Iterable[str]:
    """Every file of a directory, sorted, leaving out hidden entries (locks, partial outputs)."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".partial"))
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(root, name)


def identity(path: str, sampled: bool = True) -> Optional[str]:
    """The identity of an input: a file's SHA-256 (`sampled`: large files by blocks), a directory's
    fingerprint over its files; None when it does not exist."""
    if os.path.isfile(path):
        return _file_digest(path, sampled)
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for p in _files(path):
        h.update(os.path.relpath(p, path).encode() + b"\0" + _file_digest(p, sampled=True).encode())
    return h.hexdigest()


def input_identities(inputs: Sequence[Tuple[str, str]]) -> Dict[str, Optional[str]]:
    """{flag: identity} of a run's inputs: data files by their whole content, model directories by
    their fingerprint. A flag naming several paths gets one entry per path (`--flag#1`, ...)."""
    out: Dict[str, Optional[str]] = {}
    for flag, path in inputs:
        key = flag if flag not in out else f"{flag}#{sum(k.split('#')[0] == flag for k in out)}"
        out[key] = identity(path, sampled=not flag.endswith("_file"))
    return out


def first_difference(saved: dict, current: dict, keys: Iterable[str]) -> Optional[str]:
    """The first of `keys` whose value differs between two signatures' sections (None: all the same)."""
    for key in keys:
        if saved.get(key) != current.get(key):
            return key
    return None
