"""Fixtures shared by the whole suite: the dev data and a tiny cellpose network.

cellpose reads ``CELLPOSE_LOCAL_MODELS_PATH`` once, at import time, so it is
pointed at an empty temporary folder before anything imports cellpose: no
test can download weights or touch the real home directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_ISOLATED = Path(tempfile.mkdtemp(prefix="cpft-tests-"))
os.environ.setdefault("CELLPOSE_LOCAL_MODELS_PATH", str(_ISOLATED / "cellpose-models"))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
DEV = ASSETS / "dev"


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """The dev dataset (images/, annotations/ with train, test, pattern, 3d)."""
    assert (DEV / "images" / "train").is_dir(), "tests/assets/dev is missing"
    return DEV


@pytest.fixture(scope="session")
def formats_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev annotations in the tools' formats (tests/assets/formats, seg.zip unpacked).

    A folder with ``images/{train,test}/`` (the dev images) and, for each split,
    ``seg/`` (cellpose GUI ``_seg.npy``), ``png/`` (16-bit ``_cp_masks.png``),
    ``geojson/`` (QuPath) and ``rois/`` (ImageJ ROI sets).
    """
    import shutil
    import zipfile

    root = tmp_path_factory.mktemp("formats")
    shutil.copytree(DEV / "images", root / "images", ignore=shutil.ignore_patterns("3d", "pattern"))
    for kind in ("png", "geojson", "rois"):
        shutil.copytree(ASSETS / "formats" / kind, root / kind)
    with zipfile.ZipFile(ASSETS / "formats" / "seg.zip") as zf:
        zf.extractall(root)
    return root


def _pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    images = sorted((root / "images" / split).glob("*.tif"))
    return [(p, root / "annotations" / split / p.name) for p in images]


@pytest.fixture(scope="session")
def train_pairs(dev_data: Path) -> list[tuple[Path, Path]]:
    """The five dev training pairs (nuclei 256x256, bacteria 288x320)."""
    return _pairs(dev_data, "train")


@pytest.fixture(scope="session")
def test_pairs(dev_data: Path) -> list[tuple[Path, Path]]:
    """The two dev test pairs."""
    return _pairs(dev_data, "test")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny network of cellpose's Transformer class, as a .pth file."""
    import torch

    from cellpose_finetuning.engine.models import PRESETS, build_network, save_network

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.pth"
    save_network(build_network(PRESETS["tiny"]), PRESETS["tiny"], path)
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory, dev_data: Path) -> tuple[Path, str]:
    """`cellpose-finetuning demo` as a user runs it (seeded, default settings), once.

    Returns the work folder and the command's output. Its trained network
    (``learned_tiny``) also serves the tests that need a model that finds
    objects, such as exports replayed from the original service's clients.
    """
    from click.testing import CliRunner

    from cellpose_finetuning.cli import main

    workdir = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(
        main, ["demo", "--data", str(dev_data), "--workdir", str(workdir)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return workdir, result.output


@pytest.fixture(scope="session")
def learned_tiny(demo_run: tuple[Path, str]) -> Path:
    """The demo's trained tiny network (finds the dev nuclei), as a checkpoint file."""
    from cellpose_finetuning.engine.sessions import Session

    weights = Session(demo_run[0] / "session").weights("best")
    assert weights.is_file()
    return weights
