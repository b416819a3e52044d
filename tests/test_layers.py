"""The package's layers: imports point only downwards, no module imports itself in a cycle, and the
commands that need neither Optuna nor SQLAlchemy do not load them.

`python tests/test_layers.py` prints the house: lines per module, the longest functions and the
import graph (every `effcifar` import, also those inside functions).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "effcifar"
# Lowest layer first; a module may import modules of its own layer or of the layers before it.
LAYERS = [
    ["effcifar", "effcifar.errors", "effcifar.allocator", "effcifar.atomic", "effcifar.rundir", "effcifar.config",
     "effcifar.data", "effcifar.device", "effcifar.memory", "effcifar.models", "effcifar.train", "effcifar.airbench"],
    ["effcifar.nas", "effcifar.nas.space", "effcifar.nas.ops", "effcifar.nas.network", "effcifar.nas.costs",
     "effcifar.nas.table", "effcifar.nas.latency", "effcifar.nas.ranking", "effcifar.inference"],
    ["effcifar.studies"],
    ["effcifar.hpo", "effcifar.hpo.space", "effcifar.hpo.experiment", "effcifar.hpo.study",
     "effcifar.nas.samplers", "effcifar.nas.path_samplers", "effcifar.nas.evaluation", "effcifar.nas.shrinking",
     "effcifar.nas.checkpoint", "effcifar.nas.distributed", "effcifar.nas.supernet", "effcifar.nas.trainer",
     "effcifar.nas.search", "effcifar.nas.retrain", "effcifar.nas.select"],
    ["effcifar.pipeline", "effcifar.pipeline.plan", "effcifar.pipeline.stages", "effcifar.report", "effcifar.dashboard"],
    ["effcifar.cli", "effcifar.__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed."""
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules a module imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def graph() -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    trees = modules()
    return {name: imports(tree, set(trees)) - {name} for name, tree in trees.items()}


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - {m for layer in LAYERS for m in layer})
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_imports_point_downwards():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [node, target]))
            if target not in state:
                visit(target, path + [node])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


def test_no_module_names_a_higher_layer_in_a_string():
    """A "module:attribute" string imported by name would hide an upward dependency from the graph (the package's
    lazy public API table, `effcifar._API`, is the one exception: it imports nothing until a name is used)."""
    trees = modules()
    named = []
    for name, tree in trees.items():
        texts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        for target in trees:
            if name != "effcifar" and layer_of(target) > layer_of(name):
                pattern = re.compile(rf"(?<![\w.]){re.escape(target)}:\w")
                named += [f"{name} names {target} in {text!r}" for text in texts if pattern.search(text)]
    assert not named, "\n".join(named)


@pytest.mark.slow
def test_train_and_help_load_neither_optuna_nor_sqlalchemy(tmp_path):
    """`effcifar train --help` and a config with a NAS subnet (`arch`) stay below the study layer."""
    code = ("import json, sys\nfrom effcifar.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "from effcifar.config import build_config\nfrom effcifar.nas.space import ArchSpace\n"
            "from effcifar.train import TrainConfig\n"
            f"path = {str(tmp_path / 'arch.json')!r}\n"
            "json.dump({k: v[0] for k, v in ArchSpace.seed().choices().items()}, open(path, 'w'))\n"
            "build_config(TrainConfig, overrides={'arch': path}).validate()\n"
            "print(sorted(m for m in ('optuna', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def functions(tree: ast.Module, prefix: str) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function and method of a module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.end_lineno - node.lineno + 1, f"{prefix}.{node.name}"))
    return out


if __name__ == "__main__":
    trees = modules()
    print("lines per module:")
    for path in sorted(PACKAGE.rglob("*.py")):
        print(f"  {len(path.read_text().splitlines()):5d}  {module_name(path)}")
    print("longest functions:")
    for lines, name in sorted((f for n, t in trees.items() for f in functions(t, n)), reverse=True)[:12]:
        print(f"  {lines:5d}  {name}")
    print("imports (module -> package modules it imports):")
    for name, targets in graph().items():
        if targets:
            print(f"  {name} -> {', '.join(sorted(targets))}")
