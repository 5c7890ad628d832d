"""Data flows one way: no module imports a layer above its own.

The table is the one in docs/architecture.md ("What each package may import");
a test below checks that the page shows this same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cellpose_finetuning"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: The package's foundation, importable from everywhere: errors, shared names, version.
BASE = {"errors", "names", "__version__", "sample_data"}

#: Package -> the packages it may import (besides BASE).
ALLOWED: dict[str, set[str]] = {
    "io": set(),
    "data": {"io"},
    "engine": {"io", "data"},
    "scheduler": {"io", "data", "engine"},
    "export": {"io", "data", "engine"},
    "service": {"io", "data", "engine", "scheduler", "export"},
    "client": {"io", "data"},
    "web": set(),
    "deploy": {"io", "data", "engine", "scheduler", "export", "service", "web"},
    "cli": {"io", "data", "engine", "scheduler", "export", "service", "deploy", "client"},
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Packages of ``cellpose_finetuning`` that ``path`` imports (also inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "cellpose_finetuning":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:
                out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "cellpose_finetuning" and len(parts) > 1:
                    out.add(parts[1])
    return out


MODULES = sorted(p for p in SRC.rglob("*.py") if _package_of(p) not in BASE | {"__init__"})


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path: Path) -> None:
    package = _package_of(path)
    assert package in ALLOWED, f"{package}: a new package needs its row in ALLOWED and the doc"
    wrong = _imports(path) - ALLOWED[package] - BASE - {package}
    assert not wrong, f"{path.relative_to(SRC)} imports {sorted(wrong)}, above or beside its layer"


def test_architecture_page_shows_the_same_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    for package, allowed in ALLOWED.items():
        row = f"| `{package}` | {', '.join(f'`{a}`' for a in sorted(allowed)) or '—'} |"
        assert row in text, f"docs/architecture.md lacks the row {row}"
