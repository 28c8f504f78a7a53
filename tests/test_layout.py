"""The layers of the code base (../shared/DESIGN.md, README "For developers"): each package imports only
the packages above it in LAYERS (or its own), models/ nothing of engine/, a method package in
engine/distill/ no other method (only the shared base, sft), and no module imports itself back
through others: function-level imports count as much as module-level ones."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = ["models", "engine.runtime", "engine.text", "engine.checkpoint", "engine.infer", "engine.train",
          "engine.distill"]
SHARED_METHODS = ("engine.distill.sft",)  # what every method package may build on


def _modules():
    """module name -> file path, for every module of models/ and engine/."""
    found = {}
    for top in ("models", "engine"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[mod[: -len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return found


MODULES = _modules()


def imports_of(path: str, modules=MODULES) -> set:
    """Every module of ours that `path` imports, at any depth of the file (function-level included)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out.update(n for n in names if n in modules)
    return out


def layer_of(module: str) -> int:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    if module == "engine":
        return 0
    raise AssertionError(f"{module} belongs to no layer of LAYERS; add its package there")


def method_of(module: str):
    """engine.distill.mcc.task -> engine.distill.mcc (None outside engine/distill/)."""
    parts = module.split(".")
    return ".".join(parts[:3]) if module.startswith("engine.distill.") else None


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer_of(mod)


def test_layers_import_only_layers_above():
    wrong = []
    for mod, path in MODULES.items():
        for dep in imports_of(path):
            if layer_of(dep) > layer_of(mod):
                wrong.append(f"{mod} imports {dep} ({LAYERS[layer_of(dep)]} is below {LAYERS[layer_of(mod)]})")
    assert not wrong, "\n".join(wrong)


def test_models_import_nothing_from_engine():
    wrong = [f"{mod} imports {dep}" for mod, path in MODULES.items() if mod.startswith("models")
             for dep in imports_of(path) if dep.startswith("engine")]
    assert not wrong, "\n".join(wrong)


def test_methods_do_not_import_each_other():
    wrong = []
    for mod, path in MODULES.items():
        own = method_of(mod)
        for dep in imports_of(path):
            other = method_of(dep)
            if own and other and other != own and other not in SHARED_METHODS:
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict):
    """A list of modules forming an import cycle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = {mod: {d for d in imports_of(path) if d != mod and not mod.startswith(d + ".")}
             for mod, path in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph,expected", [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
                                            ({"a": {"b"}, "b": {"c"}, "c": set()}, False)])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert (find_cycle(graph) is not None) == expected


def test_the_layer_check_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from engine.train.trainer import Trainer\n")
    assert imports_of(str(source), {"engine.train.trainer": "", "engine.text": ""}) == {"engine.train.trainer"}
