"""The scheduler sits above the engine: nothing below it imports it (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "cellpose_finetuning"
BELOW = ["io", "data", "engine"]


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", BELOW)
def test_lower_layers_never_import_the_scheduler(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offenders = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in files
        for name in _imported(path)
        if name == "cellpose_finetuning.scheduler"
        or name.startswith("cellpose_finetuning.scheduler.")
    }
    assert not offenders


def test_the_scheduler_uses_the_engine():
    imported = set().union(*(_imported(p) for p in (PACKAGE / "scheduler").glob("*.py")))
    assert any(name.startswith("cellpose_finetuning.engine.") for name in imported)
