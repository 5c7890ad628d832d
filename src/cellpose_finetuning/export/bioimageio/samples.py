"""The sample image of a package: chosen, labelled, written as test tensors, TIFFs and cover."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.export.bioimageio.common import (
    COVER_MAX_BYTES,
    COVER_MAX_HEIGHT,
    MAX_SAMPLE_TRIES,
    SAMPLE_INPUT_FILE,
    SAMPLE_MAX_SIDE,
    SAMPLE_OUTPUT_FILE,
    ExportError,
    _Plan,
)
from cellpose_finetuning.export.bioimageio.rdf import _write_rdf
from cellpose_finetuning.export.bioimageio.runtime import _run_model


def _center_crop(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[-2:]
    top, left = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
    return image[..., top : top + min(h, max_side), left : left + min(w, max_side)]


def _prepare_sample(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(C, H, W) float32 with at most 3 channels, centre-cropped; and whether it was cropped."""
    if image.ndim != 3:
        raise InvalidInput("sample_image", f"must be a 2D image, got shape {image.shape}")
    cropped = max(image.shape[-2:]) > SAMPLE_MAX_SIDE
    image = _center_crop(image[:3], SAMPLE_MAX_SIDE)
    return np.ascontiguousarray(image, dtype=np.float32), cropped


def _sample_candidates(
    session: Session, sample_image: str | os.PathLike[str] | np.ndarray | None
) -> list[tuple[str, Any]]:
    """(name, image or path) to try as the sample: the given one, else test then train images."""
    if isinstance(sample_image, np.ndarray):
        return [("sample_image", sample_image)]
    if sample_image is not None:
        return [(Path(sample_image).name, sample_image)]
    data = session.data
    candidates = [(f"{Path(i).name} (test set)", i) for i, _ in data.test]
    candidates += [(f"{Path(i).name} (training set)", i) for i, _ in data.train]
    if not candidates:
        raise InvalidInput("sample_image", "the session has no images; pass sample_image")
    return candidates[:MAX_SAMPLE_TRIES]


def _segment_a_sample(
    model: Any, candidates: list[tuple[str, Any]]
) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """The first candidate the model finds objects in: (image, labels, name, cropped).

    The spec refuses an all-zero test output ("too small for reliable
    testing"), so a sample without any object cannot make a valid package.
    """
    from cellpose_finetuning.io.images import read_image, to_canonical

    tried = []
    for name, source in candidates:
        if isinstance(source, np.ndarray):
            raw = to_canonical(source, name="sample_image")
        else:
            raw = read_image(source)
        image, cropped = _prepare_sample(raw)
        labels = _run_model(model, image[None])
        if labels.max() > 0:
            return image, labels, name, cropped
        tried.append(name)
    raise _no_objects_error(tried, getattr(model, "eval_kwargs", {}))


def _write_cover(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Input beside its segmentation (2:1 for square images), at most 400 px high."""
    from PIL import Image

    from cellpose_finetuning.engine.plots import normalize_for_display, overlay_masks

    left = (normalize_for_display(image) * 255).round().astype("uint8")
    right = overlay_masks(image, labels)
    gap = np.full((left.shape[0], max(2, left.shape[1] // 64), 3), 255, "uint8")
    picture = Image.fromarray(np.concatenate([left, gap, right], axis=1))
    if picture.height > COVER_MAX_HEIGHT:
        scale = COVER_MAX_HEIGHT / picture.height
        picture = picture.resize(
            (max(1, round(picture.width * scale)), COVER_MAX_HEIGHT), Image.Resampling.LANCZOS
        )
    picture.save(path, optimize=True)
    if path.stat().st_size > COVER_MAX_BYTES:
        # The spec asks for covers under 500 kB; a 256-colour palette keeps the look.
        picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _write_sample_tiffs(
    out: Path, image: np.ndarray, labels: np.ndarray, files: dict[str, Path]
) -> None:
    import tifffile

    files[SAMPLE_INPUT_FILE] = out / SAMPLE_INPUT_FILE
    files[SAMPLE_OUTPUT_FILE] = out / SAMPLE_OUTPUT_FILE
    tifffile.imwrite(files[SAMPLE_INPUT_FILE], image.astype(np.float32))
    tifffile.imwrite(files[SAMPLE_OUTPUT_FILE], labels.astype(np.int32))


def _label_standard_sample(
    out: Path, plan: _Plan, candidates: list[tuple[str, Any]]
) -> tuple[np.ndarray, np.ndarray, str, bool, _Plan]:
    """The first candidate tile the package finds objects in, labelled by running the package.

    Each candidate is cut to one network tile and written as the test input;
    ``bioimageio.core`` then runs the package on it exactly as its model test
    will, and that is the test output.
    """
    from cellpose_finetuning.export.bioimageio import standard as std
    from cellpose_finetuning.io.images import read_image, to_canonical

    tried = []
    placeholder = None
    for name, source in candidates:
        raw = to_canonical(source, name="sample_image") if isinstance(source, np.ndarray) else None
        raw = raw if raw is not None else read_image(source)
        if raw.ndim != 3:
            raise InvalidInput("sample_image", f"must be a 2D image, got shape {raw.shape}")
        image, cropped = std.fit_to_tile(raw[:3], plan.arch.bsize)
        plan = dataclasses.replace(plan, sample_shape=tuple(image.shape), sample_name=name)
        np.save(out / "input_sample.npy", image[None])
        if placeholder is None:
            # Replaced below; the package is loaded without IO checks to make the real one.
            placeholder = np.ones((1, 1, *image.shape[-2:]), std.LABELS_DTYPE)
        np.save(out / "output_sample.npy", placeholder)
        _write_sample_tiffs(out, image, placeholder[0, 0], {})
        _write_cover(image, placeholder[0, 0], out / "cover.png")
        _write_rdf(plan, out)
        labels = std.run_package_on_test_input(out)
        if labels.max() > 0:
            np.save(out / "output_sample.npy", labels)
            return image, labels, name, cropped, plan
        tried.append(name)
    raise _no_objects_error(tried, plan.inference)


def _no_objects_error(tried: list[str], inference: Mapping[str, Any]) -> ExportError:
    """Which images were tried and what to change: bioimage.io refuses an empty test output."""
    return ExportError(
        f"the model finds no objects in the sample image(s) {', '.join(tried)}, and "
        "bioimage.io needs a test output with objects: train longer, lower "
        f"cellprob_threshold (now {inference.get('cellprob_threshold')}) or flow_threshold "
        f"(now {inference.get('flow_threshold')}), or pass a sample_image with objects the "
        "model finds",
        [f"no objects in {n}" for n in tried],
    )
