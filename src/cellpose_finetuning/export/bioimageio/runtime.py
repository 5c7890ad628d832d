"""Loading a package's own ``model.py`` and weights, and running them."""

from __future__ import annotations

import importlib.util
import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.export.bioimageio.common import _sha256


def _load_wrapper_module(model_py: Path) -> Any:
    """Import the package's own ``model.py`` (not our copy) under a unique name."""
    name = f"_cpft_export_{_sha256(model_py)[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, model_py)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_exported_model(
    package_dir: Path, architecture: Mapping[str, Any], weights_file: str
) -> Any:
    """Instantiate the package's architecture and load its weights strictly (as bioimageio.core)."""
    import torch

    module = _load_wrapper_module(package_dir / architecture["source"])
    model = getattr(module, architecture["callable"])(**architecture.get("kwargs", {}))
    state = torch.load(package_dir / weights_file, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _run_model(model: Any, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    return out.cpu().numpy().astype(np.int32, copy=False)


def run_exported_model(package_dir: str | os.PathLike[str], image: np.ndarray) -> np.ndarray:
    """Run a package's ``model.py`` + ``model_weights.pth`` on a (B, C, H, W) batch.

    Reads the architecture kwargs from ``rdf.yaml`` and loads the weights
    with strict key checking, as ``bioimageio.core`` does.

    Returns
    -------
    numpy.ndarray
        (B, 1, H, W) int32 labels.
    """
    import yaml

    package_dir = Path(package_dir)
    weights = yaml.safe_load((package_dir / "rdf.yaml").read_text())["weights"]
    entry = weights["pytorch_state_dict"]
    model = _load_exported_model(package_dir, entry["architecture"], entry["source"])
    return _run_model(model, image)


def package_predictor(source: str | os.PathLike[str]) -> Any:
    """A predictor for :mod:`cellpose_finetuning.engine.evaluation` from an exported package.

    The package's own ``model.py`` and ``model_weights.pth`` run with the
    thresholds baked into it, exactly as a BioImage.IO consumer runs them.

    Parameters
    ----------
    source : path-like
        A package folder (with ``rdf.yaml``) or its ``.zip``.

    Returns
    -------
    callable
        ``(C, H, W)`` image -> ``(H, W)`` int32 labels.
    """
    import tempfile

    import yaml

    path = Path(source)
    if path.is_file() and zipfile.is_zipfile(path):
        tmp = tempfile.TemporaryDirectory(prefix="cpft-package-")
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if Path(member).is_absolute() or ".." in Path(member).parts:
                    raise InvalidInput(str(path), f"unsafe path in the zip: {member!r}")
            zf.extractall(tmp.name)
        root = Path(tmp.name)
        rdfs = sorted(root.rglob("rdf.yaml")) or sorted(root.rglob("*.bioimageio.yaml"))
        if not rdfs:
            raise InvalidInput(str(path), "no rdf.yaml in the package")
        package_dir = rdfs[0].parent
    elif (path / "rdf.yaml").is_file():
        tmp, package_dir = None, path
    else:
        raise InvalidInput(str(path), "not a package folder (rdf.yaml) or a package .zip")
    entry = yaml.safe_load((package_dir / "rdf.yaml").read_text())["weights"]
    entry = entry["pytorch_state_dict"]
    model = _load_exported_model(package_dir, entry["architecture"], entry["source"])

    def predict(image: np.ndarray, _keep: Any = tmp) -> np.ndarray:
        return _run_model(model, np.asarray(image, dtype="float32")[None])[0, 0]

    return predict
