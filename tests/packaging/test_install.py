"""The built wheel in a fresh venv per extra, as a user installs it (slow; `make test` runs it).

For each of base, ``[client]``, ``[export]`` and ``[server]``: build the wheel once, create
a fresh venv, install ``'cellpose_finetuning-*.whl[extra]'`` with the versions of
``requirements-lock.txt`` as constraints, then import every module the extra promises
(``extras.PROMISED``), check that the other extras' libraries are absent (so nothing
passed by accident) and check the installed requirements. In the base venv,
``cellpose-finetuning demo`` runs from a folder outside the checkout.

The installer is ``uv`` (the ``dev`` extra): each venv gets everything from PyPI through
uv's cache (``UV_CACHE_DIR``, else uv's default), so torch and its CUDA libraries are
downloaded once and hard-linked into every venv. Measured on the 2-core VM: the four
installs take 87 s with an empty cache (65 s of it downloading torch), 16 s with a warm one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from tests.packaging.extras import PROMISED, SRC

# the demo trains for one epoch in the base venv: minutes on 2 busy cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = SRC.parent
LOCK = ROOT / "requirements-lock.txt"
#: libraries an install of ``extra`` must not have (they belong to other extras)
ABSENT = {
    "base": ["hypha_rpc", "hypha", "bioimageio", "ray", "boto3"],
    "client": ["hypha", "bioimageio", "ray", "boto3"],
    "export": ["hypha_rpc", "hypha", "ray"],
    "server": ["bioimageio", "ray"],
}


def _uv() -> str:
    from uv import find_uv_bin  # the dev extra's uv (requirements-lock.txt pins it)

    return find_uv_bin()


def _env() -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["MPLBACKEND"] = "Agg"
    env["UV_NO_PROGRESS"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = out / "build"
    skip = shutil.ignore_patterns(
        ".venv*", ".git", "build", "dist", "*.egg-info", "runs", "__pycache__"
    )
    shutil.copytree(ROOT, build, symlinks=True, ignore=skip)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, "."],
        cwd=build,
    )
    shutil.rmtree(build)
    (found,) = out.glob("cellpose_finetuning-*.whl")
    return found


def test_the_wheel_carries_the_sample_data_and_stays_small(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    data = [n for n in names if n.startswith("cellpose_finetuning/sample_data/")]
    for split, count in (("train", 5), ("test", 2)):
        for kind in ("images", "annotations"):
            tifs = [n for n in data if f"/{kind}/{split}/" in n and n.endswith(".tif")]
            assert len(tifs) == count, (kind, split, tifs)
    assert "cellpose_finetuning/sample_data/README.md" in names  # the attribution travels
    assert wheel.stat().st_size < 1_500_000, wheel.stat().st_size
    assert not [n for n in names if n.startswith("tests/")]


@pytest.mark.parametrize("extra", ["base", "client", "export", "server"])
def test_the_wheel_installs_and_imports_in_a_fresh_venv(extra: str, wheel: Path, tmp_path: Path):
    uv = _uv()
    env_dir = tmp_path / "venv"
    python = env_dir / "bin" / "python"
    spec = f"{wheel}" if extra == "base" else f"{wheel}[{extra}]"
    t0 = time.monotonic()
    _run([uv, "venv", "--quiet", "--python", sys.executable, env_dir], cwd=tmp_path)
    _run([uv, "pip", "install", "--python", python, "--constraint", LOCK, spec], cwd=tmp_path)
    install_s = time.monotonic() - t0

    modules = PROMISED["base"] + ([] if extra == "base" else PROMISED[extra])
    code = f"""
        import importlib, importlib.util, sys
        for name in {modules!r}:
            importlib.import_module(name)
        present = [n for n in {ABSENT[extra]!r} if importlib.util.find_spec(n) is not None]
        assert not present, f"installed without being asked for: {{present}}"
        import cellpose_finetuning
        assert "site-packages" in cellpose_finetuning.__file__, cellpose_finetuning.__file__
        print("imported", len({modules!r}))
    """
    out = _run([python, "-c", textwrap.dedent(code)], cwd=tmp_path)
    # (hypha's import logs warnings to stdout: read the last line only)
    assert out.stdout.strip().splitlines()[-1] == f"imported {len(modules)}", out.stdout
    _run([uv, "pip", "check", "--python", python], cwd=tmp_path)

    if extra == "base":  # the demo, from a folder that is not the checkout
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env_models = tmp_path / "cellpose-models"
        t1 = time.monotonic()
        result = subprocess.run(
            [env_dir / "bin" / "cellpose-finetuning", "demo", "--n-epochs", "1"],
            cwd=elsewhere,
            env={**_env(), "CELLPOSE_LOCAL_MODELS_PATH": str(env_models)},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1].startswith("Demo: AP@0.5 "), result.stdout
        demo = elsewhere / "runs" / "demo"
        report = json.loads((demo / "evaluation" / "evaluation.json").read_text())
        assert [m["model"] for m in report["models"]] == ["tiny", "session"]
        assert report["images"] == ["nuclei_03.tif"]  # the test image shipped in the wheel
        status = json.loads((demo / "session" / "status.json").read_text())
        assert status["status_type"] == "completed", status["message"]
        print(f"demo from the wheel: {time.monotonic() - t1:.0f} s")
    print(f"[{extra}] uv venv + install: {install_s:.0f} s")
    shutil.rmtree(env_dir)  # 1-2 GB each
