"""The built wheel in a fresh venv per extra, as a user installs it (slow: `make test-install`).

For each of base, ``[client]``, ``[export]`` and ``[server]``: build the wheel, create a
fresh venv, ``pip install -c requirements-lock.txt 'cellpose_finetuning-*.whl[extra]'``,
then import every module the extra promises (``extras.PROMISED``), check that the
other extras' libraries are absent (so nothing passed by accident) and run
``pip check``. In the base venv, ``cellpose-finetuning demo`` runs from a folder outside
the checkout.

torch and its CUDA libraries (6 GB a venv) are not installed four times: they are
hard-linked from this environment into a folder that each venv sees through a ``.pth``
file, as for a user who installed torch first. Everything else comes from the wheel's
own metadata. ``CPFT_INSTALL_TEST_TORCH=install`` installs torch in each venv instead.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import venv
import zipfile
from pathlib import Path

import pytest

from tests.packaging.extras import PROMISED, SRC

# pip installs a few hundred MB per venv: minutes each on 2 busy cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = SRC.parent
LOCK = ROOT / "requirements-lock.txt"
TORCH_FAMILY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
#: libraries an install of ``extra`` must not have (they belong to other extras)
ABSENT = {
    "base": ["hypha_rpc", "hypha", "bioimageio", "ray", "boto3"],
    "client": ["hypha", "bioimageio", "ray", "boto3"],
    "export": ["hypha_rpc", "hypha", "ray"],
    "server": ["bioimageio", "ray"],
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["MPLBACKEND"] = "Agg"
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


@pytest.fixture(scope="module")
def shared_torch(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """torch and its CUDA libraries from this environment, hard-linked into one folder."""
    if os.environ.get("CPFT_INSTALL_TEST_TORCH") == "install":
        return None
    target = tmp_path_factory.mktemp("torch-site")
    for dist in md.distributions():
        if not TORCH_FAMILY.match(_norm(dist.metadata["Name"])):
            continue
        for file in dist.files or []:
            src = Path(dist.locate_file(file)).resolve()
            if not src.is_file() or ".." in file.parts:  # console scripts live in bin/
                continue
            dst = target / file
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
    assert (target / "torch" / "__init__.py").is_file()
    return target


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
def test_the_wheel_installs_and_imports_in_a_fresh_venv(
    extra: str, wheel: Path, shared_torch: Path | None, tmp_path: Path
):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
        ).stdout.strip()
    )
    if shared_torch is not None:
        (site / "_cpft_shared_torch.pth").write_text(f"{shared_torch}\n")
        # the torch that is there stands; the lock pins everything else
        lock = [
            line
            for line in LOCK.read_text().splitlines()
            if not TORCH_FAMILY.match(_norm(line.split("==")[0]))
        ]
        constraints = tmp_path / "constraints.txt"
        constraints.write_text("\n".join(lock) + "\n")
    else:
        constraints = LOCK
    spec = f"{wheel}" if extra == "base" else f"{wheel}[{extra}]"
    t0 = time.monotonic()
    _run([python, "-m", "pip", "install", "--quiet", "-c", constraints, spec], cwd=tmp_path)
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
    _run([python, "-m", "pip", "check"], cwd=tmp_path)

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
        masks = sorted(p.name for p in (elsewhere / "runs" / "demo" / "masks").glob("*.tif"))
        assert masks == ["bacteria_t19_masks.tif", "nuclei_03_masks.tif"], masks
        status = (elsewhere / "runs" / "demo" / "session" / "status.json").read_text()
        assert '"completed"' in status
        print(f"demo from the wheel: {time.monotonic() - t1:.0f} s")
    print(f"[{extra}] pip install: {install_s:.0f} s")
    shutil.rmtree(env_dir)  # 1-2 GB each
