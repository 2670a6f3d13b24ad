"""The house rules a program can check: imports run down the stages, modules stay small, tools
use the public API only.

Data flows calibrate -> optimizer -> export -> runtime. Shared code lives below the stages
(``core``, ``kernels``, ``nn``), and no stage imports a later one; the runtime imports no stage at
all (a deployment needs runtime + nn + kernels + core alone). docs/architecture.md draws the same
graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffkiln"

# What each part of the package may import (besides itself and third-party code).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "kernels": {"core"},
    "nn": {"core", "kernels"},
    "calibrate": {"core"},
    "optimizer": {"core", "kernels", "nn", "calibrate"},
    "export": {"core", "kernels", "nn", "calibrate", "optimizer"},
    "runtime": {"core", "kernels", "nn"},
    "zoo": {"core"},
    # Test helpers for what diffkiln writes (the bundle fuzzer): they read bundles as the runtime does.
    "testing": {"core"},
    # The entry points above the stages: they string the stages together.
    "api": {"core", "kernels", "nn", "calibrate", "optimizer", "export", "runtime", "zoo"},
    "report": {"core", "kernels", "nn", "calibrate", "optimizer", "export", "runtime", "zoo", "api"},
    "cli": {"core", "kernels", "nn", "calibrate", "optimizer", "export", "runtime", "zoo", "api", "report"},
}
# Top-level modules and the part they belong to.
TOP_LEVEL = {"__init__": "api", "api": "api", "generation": "api", "outputs": "api", "cli": "cli", "cli_args": "cli",
             "cli_recipe_args": "cli", "cli_values": "cli", "__main__": "cli"}  # fmt: skip


def _part(module: str) -> str | None:
    """``diffkiln.calibrate.stats`` -> ``calibrate``; None for third-party modules."""
    parts = module.split(".")
    if parts[0] != "diffkiln":
        return None
    if len(parts) == 1:
        return "api"
    name = parts[1]
    return TOP_LEVEL.get(name, name)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, function-local ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # ``from diffkiln import api`` names a module too.
            out.extend(
                (node.lineno, f"{node.module}.{a.name}")
                for a in node.names
                if node.module == "diffkiln" and not a.name.startswith("__")
            )
    return out


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "weights" not in p.parts)


def test_every_part_of_the_package_has_a_rule() -> None:
    parts = {_part(".".join(("diffkiln", *p.relative_to(PACKAGE).with_suffix("").parts))) for p in _sources()}
    assert parts <= set(ALLOWED), sorted(parts - set(ALLOWED))


def test_no_import_runs_upward() -> None:
    upward = []
    for path in _sources():
        module = ".".join(("diffkiln", *path.relative_to(PACKAGE).with_suffix("").parts))
        here = _part(module)
        assert here is not None
        for line, imported in _imports(path):
            there = _part(imported)
            if there is None or there == here or imported == "diffkiln":
                continue
            if there not in ALLOWED[here]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {imported}")
    assert not upward, "\n".join(upward)


def test_no_module_over_450_lines() -> None:
    big = [f"{p.relative_to(ROOT)} ({n})" for p in _sources() if (n := len(p.read_text().splitlines())) > 450]
    assert not big, big


@pytest.mark.parametrize("tool", sorted((ROOT / "tools").glob("*.py")), ids=lambda p: p.name)
def test_tools_use_the_public_api_only(tool: Path) -> None:
    problems = []
    for line, imported in _imports(tool):
        if imported.startswith("diffkiln") and any(part.startswith("_") for part in imported.split(".")):
            problems.append(f"line {line}: imports private module {imported}")
    tree = ast.parse(tool.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffkiln"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            problems += [f"line {node.lineno}: imports private name {name}" for name in private]
        named_sys = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys"
        if named_sys and node.attr == "path":
            problems.append(f"line {node.lineno}: edits sys.path")
    assert not problems, problems
