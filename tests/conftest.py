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


def wait_until(predicate, timeout: float = 120.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (status files have no events)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")


def forge_tiff_size(path, height: int, width: int) -> None:
    """Rewrite a small TIFF's header so that it declares ``height x width`` pixels.

    Gives a few-hundred-byte file that claims gigabytes, to test that readers
    refuse it from the header without reading or allocating the pixels.
    """
    import struct

    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        fields = [(tags[n].valueoffset, int(tags[n].dtype)) for n in ("ImageLength", "ImageWidth")]
    data = bytearray(path.read_bytes())
    for (offset, dtype), value in zip(fields, (height, width), strict=True):
        struct.pack_into("<H" if dtype == 3 else "<I", data, offset, value)
    path.write_bytes(bytes(data))


async def follow_status(svc, session_id: str, done=None, interval: float = 0.5, timeout=600):
    """Poll a service's ``get_training_status`` until ``done(status)``.

    Returns the last status and every status seen (RPC status has no events).
    """
    import asyncio
    import time

    done = done or (lambda st: st["status_type"] in ("completed", "failed"))
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        status = await svc.get_training_status(session_id)
        seen.append(status)
        if done(status):
            return status, seen
        await asyncio.sleep(interval)
    raise TimeoutError(f"session {session_id} not done within {timeout} s: {seen[-1]}")


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
