"""Shared launcher plumbing: flags as dataclass fields (`flag`), the fire entry point of an arguments
class (`launcher(..., run=job)`; `command(cls, run=job)` for a sub-command whose required flags may
also be given by position, as infer.py's), strict flag checks, and one-sentence errors for user
mistakes."""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
import time
import typing
from dataclasses import MISSING, field, fields

from engine.runtime.errors import UserError

# Outside torchrun (e.g. ranks started by another launcher), a rank other than 0 waits this long before
# printing its error: rank 0, which usually fails with the same sentence, prints first and its exit
# ends the job. Under torchrun the ranks of a node agree instead on which one prints (say_once).
RANK_GRACE_S = 3.0
SEED_MAX = 2**32 - 1
_WAIT_FOR_PRINTER_S = 20.0  # how long a rank waits for the one printing its sentence before printing it itself


def _node_job_key() -> typing.Optional[str]:
    """What the ranks of one torchrun job on this node share and no other job does: the agent process
    (their parent) with its start time, the restart, the rendezvous; None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    agent = os.getppid()
    try:
        with open(f"/proc/{agent}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    parts = [str(agent), started] + [
        os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_PORT")
    ]
    return "|".join(parts)


def say_once(line: str) -> None:
    """Print `line` on stderr once per torchrun job and node, whichever ranks reach it and in whatever
    order: the first rank to claim it (an exclusive file create) prints it and marks the claim; any other
    waits for that mark before going on (its exit makes torchrun end the job, the printer with it), and
    prints the line itself only if the printer died first. No timing is assumed."""
    key = _node_job_key()
    if key is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if key is None and int(os.environ.get("RANK", "0")) != 0:
            time.sleep(RANK_GRACE_S)
        print(line, file=sys.stderr, flush=True)
        return
    import hashlib
    import tempfile

    digest = hashlib.sha256(f"{key}|{line}".encode()).hexdigest()[:32]
    claim = os.path.join(tempfile.gettempdir(), f"cot-engine-said-{digest}")
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        deadline = time.monotonic() + _WAIT_FOR_PRINTER_S
        while time.monotonic() < deadline:
            if os.path.getsize(claim):
                return  # printed by the rank that claimed it
            time.sleep(0.05)
        print(line, file=sys.stderr, flush=True)
        return
    except OSError:  # no writable temporary directory: print, possibly twice
        print(line, file=sys.stderr, flush=True)
        return
    print(line, file=sys.stderr, flush=True)
    os.write(fd, b"printed\n")
    os.close(fd)
    _forget_old_claims(os.path.dirname(claim))


def _forget_old_claims(directory: str) -> None:
    """Remove the claim files of jobs that ended over a day ago (each is a few bytes, one per sentence)."""
    import glob

    for old in glob.glob(os.path.join(directory, "cot-engine-said-*")):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(old) > 86400:
                os.unlink(old)


# A rank whose collective broke because another rank exited (its error is the root cause) waits this
# long, quietly, for torchrun to end it, instead of adding its own traceback to the report.
PEER_WAIT_S = 10.0
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def fail(message: str, code: int = 2) -> None:
    """Print one error sentence and exit non-zero. torchrun kills every rank as soon as one exits, so
    each failing rank may print the sentence (say_once: once per job) instead of counting on rank 0 to
    still be alive."""
    from engine.runtime.progress import close_bars

    close_bars()  # the sentence is the last line, below a bar, not above one redrawn after it
    say_once(f"error: {message}")
    _tell_torchrun(f"error: {message}")
    sys.exit(code)


def _tell_torchrun(sentence: str) -> None:
    """Under torchrun, the sentence in the rank's error file too: torchrun's closing report then
    shows it as the root cause's `traceback :` (the last lines it prints) instead of a link."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json

        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": sentence, "extraInfo": {
                    "py_callstack": sentence, "timestamp": str(int(time.time()))}}}, f)  # torchelastic's format
        except OSError:
            pass  # the sentence is on stderr already


# ----- Ctrl-C: one line saying what was kept and how to go on ------------------------------------
_KEPT: list = []  # functions returning what an interrupted run keeps and how to continue it (newest last)
NOTHING_KEPT = "nothing was written: outputs appear only once complete; run the same command again"


def on_interrupt(note) -> None:
    """Register what an interrupt of this run keeps (a string, or a function returning one); the newest
    registration wins."""
    _KEPT.append(note)


def interrupted_note() -> str:
    for note in reversed(_KEPT):
        try:
            text = note() if callable(note) else note
        except Exception:  # the note must never hide the interrupt itself
            continue
        if text:
            return text
    return NOTHING_KEPT


def _interrupted() -> None:
    import signal

    with contextlib.suppress(ValueError, OSError):  # torchrun follows Ctrl-C with SIGTERM: let the line out
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    say_once(f"interrupted: {interrupted_note()}")
    sys.exit(130)


def check_seed(value: int, name: str = "seed") -> int:
    """A seed every generator takes: a whole number in [0, 2^32 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise UserError(f"--{name} must be a whole number from 0 to {SEED_MAX}, got {value}")
    return value


def check_finite(values: dict) -> None:
    """Refuse a float flag that is NaN or infinite (`--lr 1e999`): no flag means anything there."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")


def unknown_flags(component, argv) -> list:
    """Flags in argv that the called function does not take (fire would run the job first and
    complain only afterwards)."""
    fn, args = component, list(argv)
    if isinstance(component, dict):
        if not args or args[0] not in component:
            return []
        fn, args = component[args[0]], args[1:]
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    bad = []
    for a in args:
        if a == "--":
            break
        if a.startswith("--") and len(a) > 2:
            name = a[2:].split("=", 1)[0].replace("-", "_")
            if name not in params and name not in ("help", "helpfull", "trace", "verbose", "interactive", "completion"):
                bad.append("--" + name)
    return bad


def _raw_flag_text(name: str, argv) -> typing.Optional[str]:
    """The text the user typed after --name (fire has already turned '5' into 5 and 'a,b' into a tuple)."""
    value = None
    for i, a in enumerate(argv):
        for spelling in ("--" + name, "--" + name.replace("_", "-")):
            if a == spelling and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(spelling + "="):
                value = a[len(spelling) + 1:]
    return value


def _coerce(name: str, value, kind, default, argv):
    """`value` as fire parsed it, checked against the flag's annotated type; raises UserError."""
    if value is None and default is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"--{name} must be True or False, not {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"--{name} must be a whole number, not {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_finite({name: float(value)})
            return float(value)
        raise UserError(f"--{name} must be a number, not {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        if value is True:  # `--name` followed by another flag
            raise UserError(f"--{name} needs a value")
        raw = _raw_flag_text(name, argv)  # e.g. --stop 5, --lora_targets wq,wk
        if raw is not None:
            return raw
        if isinstance(value, (int, float)):  # given positionally
            return str(value)
        raise UserError(f"--{name} must be a string, not {value!r}")
    return value


def checked_flags(fn):
    """Wrap a launcher so every flag is checked against its annotation (int, float, bool, str) before
    the job runs: `--lr abc` ends in one sentence instead of a TypeError deep inside."""
    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        for name, value in list(bound.arguments.items()):
            kind = hints.get(name)
            kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # Optional[X] -> X
            default = sig.parameters[name].default
            bound.arguments[name] = _coerce(name, value, kind, None if default is inspect.Parameter.empty
                                            else default, sys.argv)
        return fn(*bound.args, **bound.kwargs)

    return wrapper


def run_cli(component) -> None:
    import fire

    try:
        argv, component = apply_config(component, sys.argv[1:])
    except UserError as e:
        fail(str(e))
    bad = unknown_flags(component, argv)
    if bad:
        fail(f"unknown flag {', '.join(bad)}; see --help for the flags this command takes")
    if isinstance(component, dict):
        component = {k: checked_flags(v) for k, v in component.items()}
    else:
        component = checked_flags(component)
    try:
        try:
            fire.Fire(component, command=argv)
        except BaseException:
            from engine.runtime.progress import close_bars

            close_bars()  # a traceback too comes after the bars, not above one redrawn below it
            raise
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        _interrupted()
    except RuntimeError as e:
        if not (os.environ.get("TORCHELASTIC_ERROR_FILE") and any(s in str(e) for s in _PEER_GONE)):
            raise
        _wait_to_be_ended(e)


def _wait_to_be_ended(error: RuntimeError) -> None:
    """Another rank exited (torchrun names it, its sentence included, as the root cause): wait for
    torchrun's SIGTERM without a traceback; one line if none comes (another node's rank failed)."""
    time.sleep(PEER_WAIT_S)
    first = str(error).strip().splitlines()[0][:300]
    print(f"error: rank {os.environ.get('RANK', '0')} lost another rank ({first}); that rank's error is above",
          file=sys.stderr, flush=True)
    sys.exit(1)


# ----- --config FILE: a run written down once (YAML or JSON, its keys the flags) ----------------------
_CONFIG: dict = {}  # what apply_config read: {"config_file": path, "config": {flag: value}}


def loaded_config() -> dict:
    """The --config this process's launcher read ({} without one), for the run's records."""
    return dict(_CONFIG)


def read_config(path: str) -> dict:
    """A run file's {flag: value}: JSON (.json), else YAML; one sentence for a file that is not one."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path} does not exist")
    text = open(path, encoding="utf-8").read()
    if path.endswith(".json"):
        import json

        try:
            values = json.loads(text)
        except ValueError as e:
            raise UserError(f"--config {path} is not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise UserError(f"--config {path} is YAML, which needs PyYAML (pip install pyyaml); or write the "
                            f"run as a .json file") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"--config {path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must map flag names to values, not hold a {type(values).__name__}")
    return {str(k).replace("-", "_"): ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            for k, v in values.items()}


def apply_config(component, argv):
    """(argv without --config FILE, the component with that file's values as the flags' defaults):
    every key must be a flag of the command run (else one sentence naming the file and the key), and a
    flag on the command line wins over the file."""
    path, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    if path is None:
        return argv, component
    name = rest[0] if isinstance(component, dict) and rest and rest[0] in component else None
    if isinstance(component, dict) and name is None:
        raise UserError(f"--config {path}: name the command first ({' / '.join(component)})")
    fn = component[name] if name else component
    values = read_config(path)
    _CONFIG.update(config_file=os.path.abspath(path), config=dict(values))
    wrapped = _with_defaults(fn, values, path, os.path.basename(sys.argv[0]) + (f" {name}" if name else ""))
    return rest, ({**component, name: wrapped} if name else wrapped)


def _with_defaults(fn, values: dict, path: str, command_name: str):
    """fn taking `values` for the flags the command line leaves out (and showing them as defaults)."""
    sig = inspect.signature(fn)
    unknown = [k for k in values if k not in sig.parameters]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}, not a flag of {command_name} (see its --help)")
    hints = typing.get_type_hints(fn)
    for key, value in values.items():
        kind = next((t for t in typing.get_args(hints.get(key)) if t is not type(None)), hints.get(key))
        if isinstance(value, str) and kind in (int, float):  # YAML reads 3e-3 as a string
            try:
                values[key] = kind(value)
            except ValueError:
                raise UserError(f"{path}: {key} must be a number, not {value!r}") from None
    # keyword-only (fire then passes every flag by name): a required flag the file gives is optional
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=values.get(p.name, p.default))
              for p in sig.parameters.values()]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = sig.bind_partial(*args, **kwargs).arguments
        return fn(*args, **{**{k: v for k, v in values.items() if k not in given}, **kwargs})

    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


def flag(text: str, default=MISSING, role: typing.Optional[str] = None):
    """A command-line flag: a dataclass field with its one line of help. `role` ("input" / "output")
    says that a flag names a path the run reads or writes where its name does not (see
    engine/runtime/outputs.py: names ending in _file, _dir ... are inputs already)."""
    return field(default=default, metadata={"help": text, **({"role": role} if role else {})})


def flag_fields(cls):
    """The command-line flags of an arguments class: required ones first, then in declaration order."""
    found = [f for f in fields(cls) if "help" in f.metadata]
    return [f for f in found if f.default is MISSING] + [f for f in found if f.default is not MISSING]


def launcher(*classes, run):
    """The fire entry point of one or more arguments classes (several: one per --objective): keyword-only
    flags with the fields' types and defaults, a --help line per flag, and a body that checks them
    (constructing the chosen class) and hands the checked arguments to `run`, the job. A flag that two
    objectives share must mean the same."""
    fields_by_name, hints = {}, {}
    for cls in classes:
        hints.update(typing.get_type_hints(cls))
        for f in flag_fields(cls):
            seen = fields_by_name.setdefault(f.name, f)
            if (seen.default, seen.metadata["help"]) != (f.default, f.metadata["help"]):
                raise TypeError(f"--{f.name} means different things in {', '.join(c.__name__ for c in classes)}")
    flags = list(fields_by_name.values())
    by_objective = {cls.OBJECTIVE: cls for cls in classes}
    if len(classes) > 1:
        choose = field(default=classes[0].OBJECTIVE, metadata={"help": (
            "the training objective: " + "; ".join(f"{c.OBJECTIVE} ({c.__doc__.strip().rstrip('.')})" for c in classes)
            + ".")})
        choose.name, hints["objective"] = "objective", str
        flags.insert(sum(f.default is MISSING for f in flags), choose)

    def main(**given):
        name = given.pop("objective", classes[0].OBJECTIVE)
        cls = by_objective.get(name)
        if cls is None:
            raise UserError(f"--objective {name!r} is not one of {', '.join(by_objective)}")
        own = {f.name for f in flag_fields(cls)}
        foreign = [k for k in given if k not in own]
        if foreign:
            users = [c.OBJECTIVE for c in classes if foreign[0] in {f.name for f in flag_fields(c)}]
            raise UserError(f"--{foreign[0]} belongs to --objective {' / '.join(users)}, not {name}")
        check_finite(given)
        run(cls(**given))

    return _described(main, _signature(flags, hints, inspect.Parameter.KEYWORD_ONLY), classes[0].SUMMARY, flags,
                      hints)


def _signature(flags, hints, kind) -> inspect.Signature:
    """What fire reads for --help and parsing: one parameter per flag, of the flag's shown type."""
    return inspect.Signature([
        inspect.Parameter(f.name, kind, annotation=_shown_type(hints[f.name]),
                          default=inspect.Parameter.empty if f.default is MISSING else f.default)
        for f in flags])


def _described(main, signature: inspect.Signature, summary: str, flags, hints):
    """main with fire's view of it: the signature, the flags' types and the --help text."""
    main.__signature__ = signature
    main.__annotations__ = {f.name: hints[f.name] for f in flags}
    main.__doc__ = "\n".join([summary, "", "Args:"] + [f"    {f.name}: {f.metadata['help']}" for f in flags])
    return main


def _shown_type(hint):
    """The type fire's --help shows for a flag: str for str and Optional[str] (fire adds the Optional for
    a None default; given Optional[str] itself it prints "Optional[Optional]")."""
    inner = [t for t in typing.get_args(hint) if t is not type(None)]
    return inner[0] if inner else hint


def command(cls, *, run):
    """The fire entry point of one sub-command's arguments class (infer.py's): like `launcher`, but the
    required flags are positional-or-keyword (fire lists them as POSITIONAL ARGUMENTS; `infer.py C D O`
    works). `cls.FLAGS`,
    when set, names the flags in --help order; the class's other fields are settings the command fixes."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in flag_fields(cls)}
    names = list(getattr(cls, "FLAGS", ()) or by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise TypeError(f"{cls.__name__}.FLAGS names {', '.join(unknown)}, which are not flag fields")
    chosen = [by_name[n] for n in names]
    flags = [f for f in chosen if f.default is MISSING] + [f for f in chosen if f.default is not MISSING]
    signature = _signature(flags, hints, inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def main(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments
        check_finite(given)
        run(cls(**given))

    return _described(main, signature, cls.SUMMARY, flags, hints)
