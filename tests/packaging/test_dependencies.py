"""Every import of ours is declared in pyproject.toml, in the extra of the module that needs it.

Static and fast: every ``import`` in ``src/`` (lazy ones inside functions included) is
mapped to the distribution that provides it in this environment, and that distribution
must be declared by the base dependencies or by an extra the module belongs to
(``extras.EXTRAS_OF``). ``test_install`` checks the same promise for real, in fresh venvs.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest

from tests.packaging.extras import PACKAGE, SRC, extras_of

ROOT = SRC.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(extras: frozenset[str]) -> set[str]:
    project = PYPROJECT["project"]
    names = {_dist_name(r) for r in project["dependencies"]}
    for extra in extras:
        names |= {_dist_name(r) for r in project["optional-dependencies"][extra]}
    return names


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _third_party(names: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n != "cellpose_finetuning"}


@functools.cache
def _providers() -> dict[str, set[str]]:
    return {
        name: {_dist_name(d) for d in dists} for name, dists in md.packages_distributions().items()
    }


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_scan_sees_imports_inside_functions():
    # engine/sessions.py imports psutil inside a function: it must be seen.
    assert "psutil" in _imports(PACKAGE / "engine" / "sessions.py")
    assert "hypha_rpc" in _imports(PACKAGE / "client.py")


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.relative_to(SRC).as_posix())
def test_every_import_is_declared_in_the_modules_extra(module: Path):
    providers = _providers()
    extras = extras_of(module)
    declared = _declared(extras)
    missing = []
    for name in sorted(_third_party(_imports(module))):
        dists = providers.get(name)
        assert dists, f"{name!r} (imported by {module.name}) is not installed here"
        if not dists & declared:
            missing.append(f"{name} (from {', '.join(sorted(dists))})")
    where = "base dependencies" + "".join(f" + [{e}]" for e in sorted(extras))
    assert not missing, (
        f"{module.relative_to(SRC)} imports {missing}, not declared in the {where}; "
        "add it to pyproject.toml or map the module in tests/packaging/extras.py"
    )


def test_the_export_extra_carries_the_pydantic_cap_and_the_base_does_not():
    base = [r for r in PYPROJECT["project"]["dependencies"] if _dist_name(r) == "pydantic"]
    export = [
        r
        for r in PYPROJECT["project"]["optional-dependencies"]["export"]
        if _dist_name(r) == "pydantic"
    ]
    assert base and "<" not in base[0], base  # napari users keep a newer pydantic
    assert export and "<2.14" in export[0], export


def test_the_lock_pins_every_distribution_of_this_environment_that_all_needs():
    """``requirements-lock.txt`` pins each dependency of ``.[all]`` that is installed."""
    lock = {
        _dist_name(line): line.split("==", 1)[1]
        for line in (ROOT / "requirements-lock.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert all(v for v in lock.values())
    wanted = _declared(frozenset({"server", "client", "export", "ray", "dev"}))
    unpinned = sorted(wanted - set(lock))
    assert not unpinned, f"not in requirements-lock.txt: {unpinned}; run `make lock`"
    assert lock["cellpose"] == "4.0.7"


def test_the_cellpose_pin_and_the_installed_cellpose_are_what_cellpose_compat_supports():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from cellpose_finetuning.engine import cellpose_compat

    supported = SpecifierSet(cellpose_compat.SUPPORTED)
    assert cellpose_compat.installed_version() in supported
    (pin,) = [
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if _dist_name(r) == "cellpose"
    ]
    assert "4.0.7" in supported and "4.0.7" in pin.specifier
    assert "4.2.0" not in pin.specifier  # 4.2 removed cellpose.vit_sam (see cellpose_compat)
