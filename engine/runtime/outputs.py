"""What a run writes, guarded once for every command that writes (infer.py, the training launchers,
checkpoint_split.py, every script in data/):

- an output that is, is inside, or holds any input of the run is refused (an output never eats an
  input), whatever --overwrite says;
- an existing output is refused unless --overwrite True, except one the command continues (a
  generation file it resumes, a training save_dir);
- the job owns each output for the whole run: an OS file lock (OUTPUT.lock beside a file, or the lock
  the command names), which is also the first write, so an unwritable path stops the run before
  anything loads;
- every OS error on an output becomes one sentence naming the path and its flag (`output_errors`,
  used by every writer in engine/runtime/fileio.py);
- final files and directories get the permissions the user's umask gives (`publish`): temporary
  files are created private and would otherwise stay so after their rename.

Which flags are outputs and which inputs is read from their names (`role`): output_file, save_dir,
save_path, plot_file, out_dir and output write; every other flag ending in _file, _dir, _dirs or
_path is read (a flag field may say otherwise with metadata {"role": ...}).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import re
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from engine.runtime.errors import UserError
from engine.runtime.lock import OwnerLock

OUTPUT_NAMES = ("output_file", "save_dir", "save_path", "plot_file", "out_dir", "output")
INPUT_SUFFIXES = ("_file", "_dir", "_dirs", "_path")


class OutputError(UserError):
    """An output that cannot or must not be written; the message names its path and flag."""


class DiskFull(OutputError):
    pass


@dataclass(frozen=True)
class Output:
    """One output of a run: its flag (`--output_file`), path, whether it is a directory, the files the
    command writes beside it (OUT.meta.json ...) and the lock file that says who owns it."""

    flag: str
    path: str
    is_dir: bool = False
    beside: Tuple[str, ...] = ()
    lock: Optional[str] = None  # default: PATH.lock beside the output
    # files of a count not known in advance that the command writes, and removes, beside the output:
    # a regular expression of their names after the output's own (infer.py's replica parts: r"\.part[1-9][0-9]*")
    beside_suffixes: Optional[str] = None

    def writes_beside(self, path: str) -> bool:
        """Whether `path` is one of the beside_suffixes files of this output."""
        if self.beside_suffixes is None:
            return False
        folder, base = os.path.split(_real(self.path))
        other_folder, name = os.path.split(_real(path))
        return folder == other_folder and re.fullmatch(re.escape(base) + self.beside_suffixes, name) is not None

    @property
    def lock_path(self) -> str:
        return self.lock or self.path.rstrip("/") + ".lock"


# ----- which flags are outputs and which inputs ---------------------------------------------------
def role(name: str, metadata=None) -> Optional[str]:
    """'output', 'input' or None (not a path) for a flag named `name`."""
    if metadata and "role" in metadata:
        return metadata["role"]
    if name in OUTPUT_NAMES:
        return "output"
    if name.endswith(INPUT_SUFFIXES):
        return "input"
    return None


def split_paths(value) -> List[str]:
    """The paths a flag value names: one path, or several (comma separated, or a list)."""
    if value is None or value is False or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v]
    return [p for p in str(value).split(",") if p] if "," in str(value) else [str(value)]


def inputs_of(values: Dict[str, object], roles: Dict[str, Optional[str]]) -> List[Tuple[str, str]]:
    """(flag, path) of every input a run names."""
    return [
        ("--" + name, p) for name, value in values.items() if roles.get(name) == "input" for p in split_paths(value)
    ]


def dataclass_roles(args) -> Dict[str, Optional[str]]:
    return {f.name: role(f.name, f.metadata) for f in fields(args) if "help" in f.metadata}


def args_inputs(args) -> List[Tuple[str, str]]:
    """(flag, path) of every input named by the flags of an arguments dataclass."""
    roles = dataclass_roles(args)
    return inputs_of({name: getattr(args, name) for name in roles}, roles)


# ----- paths: what is an input, what exists -------------------------------------------------------
def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _same(a: str, b: str) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_relations(outputs: Sequence[Output], inputs: Sequence[Tuple[str, str]]) -> None:
    """Refuse an output (or a file written beside it) that is, is inside, or holds an input."""
    for out in outputs:
        for flag, inp in inputs:
            if inp and out.writes_beside(inp):
                raise OutputError(f"{out.flag} {out.path} writes and removes files named like the {flag} {inp} "
                                  f"beside it; write it elsewhere (an output never replaces an input)")
        for path in (out.path, *out.beside):
            for flag, inp in inputs:
                if not inp:
                    continue
                o, i = _real(path), _real(inp)
                if _same(path, inp):
                    what = f"{out.flag} {out.path}" + ("" if path == out.path else f" (its {os.path.basename(path)})")
                    raise OutputError(
                        f"{what} is the {flag} {inp}; write it elsewhere (an output never replaces an input)"
                    )
                if _within(o, i) and os.path.isdir(inp):  # under a file: check_shape says so
                    raise OutputError(
                        f"{out.flag} {out.path} is inside the {flag} {inp}; write it elsewhere (an output never goes "
                        f"into an input)"
                    )
                if _within(i, o):
                    raise OutputError(
                        f"{out.flag} {out.path} holds the {flag} {inp}; choose an output that holds no input of the run"
                    )


def check_shape(out: Output) -> None:
    """A file output that is a directory, a directory output that is a file, or a parent that is a file."""
    path = out.path
    if out.is_dir and os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{out.flag} {path} exists and is a file, not a directory")
    if not out.is_dir and os.path.isdir(path):
        raise OutputError(f"{out.flag} {path} is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{out.flag} {path}: {parent} is a file, not a directory")


def is_existing(out: Output) -> bool:
    """A file that exists, a directory that holds something (besides this run's own lock)."""
    if out.is_dir:
        held = os.listdir(out.path) if os.path.isdir(out.path) else []
        return any(_real(os.path.join(out.path, n)) != _real(out.lock_path) for n in held)
    return os.path.exists(out.path)


def check_existing(out: Output, overwrite: bool, continues: Optional[Callable[[str], bool]] = None) -> None:
    """An existing output is replaced only with --overwrite True (or continued, where `continues` says
    the command wrote it and continues it)."""
    if overwrite or not is_existing(out) or (continues is not None and continues(out.path)):
        return
    if out.is_dir:
        raise OutputError(f"{out.flag} {out.path} already exists and is not empty; pass --overwrite True to replace it")
    raise OutputError(f"{out.flag} {out.path} already exists; pass --overwrite True to replace it")


# ----- the flag of a path, for error sentences --------------------------------------------------------
_FLAGS: Dict[str, str] = {}  # real path of an output of this process's run -> its flag


def register(outputs: Iterable[Output]) -> None:
    for out in outputs:
        for path in (out.path, *out.beside, out.lock_path):
            _FLAGS[_real(path)] = f"{out.flag} {out.path}"


def flag_of(path: str) -> Optional[str]:
    """'--flag PATH' of the registered output `path` is (or is inside), else None."""
    p = _real(path)
    while True:
        if p in _FLAGS:
            return _FLAGS[p]
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


_FULL = (errno.ENOSPC, errno.EDQUOT)
_WHY = {
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted there",
    errno.EROFS: "a read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENOENT: "a directory on the way cannot be created there",
    errno.EISDIR: "it is a directory",
    errno.ENAMETOOLONG: "the name is too long",
}


def output_error(e: OSError, path: str) -> OutputError:
    """One sentence for an OS error while writing `path`: the path, its flag and what to do."""
    flag = flag_of(path)
    target = e.filename if isinstance(e.filename, str) else path
    if e.errno in _FULL:
        tail = f", or choose another {flag.split()[0]}" if flag else ""
        return DiskFull(f"the disk is full: writing {path} failed ({e.strerror}); free some space and run again{tail}")
    why = _WHY.get(e.errno, e.strerror or type(e).__name__)
    where = f"{flag}: " if flag else ""
    advice = f"; choose another {flag.split()[0]}" if flag else ""
    return OutputError(f"{where}cannot write {target} ({why}){advice}")


@contextlib.contextmanager
def output_errors(path: str) -> Iterator[None]:
    """Any OS error while writing `path` ends in one sentence naming it (and its flag), not a traceback."""
    try:
        yield
    except OSError as e:
        raise output_error(e, path) from None


# ----- permissions -----------------------------------------------------------------------------------
def umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path: str, is_dir: bool = False) -> None:
    """Give a finished output (a file made private by mkstemp, a directory by mkdtemp) the permissions
    a plain open()/mkdir() would have given it under the user's umask."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


# ----- owning the outputs --------------------------------------------------------------------------------
def take_locks(outputs: Sequence[Output]) -> List[OwnerLock]:
    """Lock every output (creating a directory output that holds its own lock); the lock file is the
    run's first write, so an unwritable path stops here with one sentence."""
    locks: List[OwnerLock] = []
    try:
        for out in outputs:
            lock_dir = os.path.dirname(os.path.abspath(out.lock_path))
            with output_errors(out.lock_path):
                os.makedirs(lock_dir, exist_ok=True)
                lock = OwnerLock(out.lock_path).acquire(f"{out.flag} {out.path}", wrap_errors=False)
            locks.append(lock)
            note = lock.stale_note()
            if note:
                print(note, flush=True)
    except BaseException:
        release(locks)
        raise
    return locks


def release(locks: Sequence[OwnerLock]) -> None:
    for lock in locks:
        lock.release()


def check_before_loading(outputs: Sequence[Output], inputs: Sequence[Tuple[str, str]]) -> None:
    """What can be checked of the outputs without owning them: no input eaten, no impossible path."""
    check_relations(outputs, inputs)
    for out in outputs:
        check_shape(out)
    register(outputs)


@contextlib.contextmanager
def owned(
    outputs: Sequence[Output],
    inputs: Sequence[Tuple[str, str]] = (),
    overwrite: bool = False,
    continues: Optional[Callable[[str], bool]] = None,
) -> Iterator[List[Output]]:
    """The whole guard for a command outside a process group: relations and shapes checked, the outputs
    locked, existing ones refused unless --overwrite True (or continued), the locks released at the end.
    Under torchrun only rank 0 owns the outputs (the others check the paths and go on)."""
    outputs = [o for o in outputs if o.path]
    check_before_loading(outputs, inputs)
    if int(os.environ.get("RANK", "0")) != 0:
        yield outputs
        return
    locks = take_locks(outputs)
    try:
        for out in outputs:
            check_existing(out, overwrite, continues)
        yield outputs
    finally:
        release(locks)


def writes(
    *names: str,
    dirs: Sequence[str] = (),
    inputs: Sequence[str] = (),
    beside: Optional[Callable] = None,
    more_inputs: Optional[Callable] = None,
):
    """Guard a plain-function command (checkpoint_split.py's, data/'s scripts) with `owned`: `names` are
    its output parameters (`dirs` those that are directories), every parameter whose name says it is a
    path (`role`) or is listed in `inputs` is an input, and its `overwrite` parameter is --overwrite.
    `beside(values)` names files written beside the first output, `more_inputs(values)` inputs the
    parameters imply ((flag, path) pairs: the base an adapter names)."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            roles = {n: ("input" if n in inputs else role(n)) for n in values if n not in names}
            extra = tuple(beside(values)) if beside else ()
            outputs = [
                Output("--" + n, str(values[n]), is_dir=n in dirs, beside=extra if i == 0 else ())
                for i, n in enumerate(names)
                if values.get(n)
            ]
            read = inputs_of(values, roles) + list(more_inputs(values) if more_inputs else [])
            with owned(outputs, read, bool(values.get("overwrite", False))):
                return fn(*bound.args, **bound.kwargs)

        return guarded

    return decorate
