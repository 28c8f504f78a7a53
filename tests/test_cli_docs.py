"""Every flag the README shows exists on its launcher, and every launcher's --help explains every
flag in one line."""
import importlib
import inspect
import os
import re
import shlex

import pytest

from engine.runtime.cli import unknown_flags
from tests.helpers import ROOT, run_cli


def _components():
    import checkpoint_split
    import infer
    import train
    import train_implicit
    import train_mcc

    def mod(path):
        return importlib.import_module(path.replace("/", ".")[:-3])

    return {
        "train.py": train.main,
        "train_mcc.py": train_mcc.main,
        "train_implicit.py": dict(train_implicit.COMMANDS),
        "infer.py": {"generate": infer.generate, "evaluate": infer.evaluate, "score": infer.score,
                     "calibration": infer.calibration, "bleu": infer.bleu, None: infer.generate},
        "checkpoint_split.py": {**checkpoint_split.COMMANDS, None: checkpoint_split.split_file},
        **{script: mod(script).main for script in (
            "data/prepare_mcc.py", "data/prepare_step_by_step.py", "data/arithmetic.py", "data/make_tokenizer.py",
            "bench/train_step.py", "bench/generate.py", "bench/mcc_experiment.py",
            "bench/step_by_step_experiment.py", "data/make_formats.py", "bench/teacher_kl_experiment.py",
            "data/multiplication.py", "bench/implicit_experiment.py", "bench/gpu_check.py",
            "bench/on_policy.py", "bench/on_policy_experiment.py", "bench/sampling.py")},
    }


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            if ".py" in line:
                yield line


def _functions(component):
    return [v for v in component.values()] if isinstance(component, dict) else [component]


def test_every_readme_flag_exists():
    comps = _components()
    checked = 0
    for line in _readme_commands():
        tokens = [t.strip("[]") for t in shlex.split(line.replace("|", " "))]
        for i, tok in enumerate(tokens):
            if tok not in comps:
                continue
            comp, args = comps[tok], tokens[i + 1:]
            if isinstance(comp, dict):
                fn = comp.get(args[0]) if args and args[0] in comp else comp[None]
                args = args[1:] if args and args[0] in comp else args
            else:
                fn = comp
            args = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] != "--config"]  # run_cli's
            assert not unknown_flags(fn, args), f"README: `{line.strip()}` uses {unknown_flags(fn, args)}"
            checked += 1
    assert checked >= 25  # the README shows every launcher


@pytest.mark.parametrize("script", ["train.py", "train_mcc.py", "infer.py", "checkpoint_split.py",
                                    "data/prepare_mcc.py", "data/arithmetic.py", "data/make_tokenizer.py",
                                    "bench/train_step.py", "bench/generate.py", "bench/mcc_experiment.py",
                                    "data/prepare_step_by_step.py", "bench/step_by_step_experiment.py",
                                    "data/make_formats.py", "bench/teacher_kl_experiment.py",
                                    "train_implicit.py", "data/multiplication.py", "bench/implicit_experiment.py",
                                    "bench/gpu_check.py", "bench/on_policy.py", "bench/on_policy_experiment.py",
                                    "bench/sampling.py"])
def test_help_explains_every_flag_in_one_line(script):
    for fn in _functions(_components()[script]):
        doc = inspect.getdoc(fn) or ""
        assert "Args:" in doc, f"{script}:{fn.__name__} has no Args section"
        args_lines = doc.split("Args:", 1)[1].strip("\n").splitlines()
        described = {}
        for line in args_lines:
            m = re.match(r"    (\w+(?:, \w+)*): (\S.*)$", line)
            assert m, f"{script}:{fn.__name__}: '{line}' is not one 'flag: explanation' line"
            for name in m.group(1).split(", "):
                described[name] = m.group(2)
        params = [p for p in inspect.signature(fn).parameters if not p.startswith("_")]
        missing = [p for p in params if p not in described]
        assert not missing, f"{script}:{fn.__name__} does not explain {missing}"
        stale = [d for d in described if d not in params]
        assert not stale, f"{script}:{fn.__name__} explains {stale}, which it does not take"


@pytest.mark.processes
def test_help_runs():
    proc = run_cli("train_mcc.py", "--help")
    assert proc.returncode == 0 and "num_rationales" in proc.stdout + proc.stderr
    proc = run_cli("train.py", "--no_such_flag", "1")
    assert proc.returncode != 0 and "unknown flag --no_such_flag" in proc.stderr
