"""What ``infer`` writes: the output formats, their file names, and the masks they accept.

Shared by the writers of each format (:mod:`~cellpose_finetuning.io.seg_npy`,
:mod:`~cellpose_finetuning.io.geojson`, :mod:`~cellpose_finetuning.io.imagej_rois`)
and :func:`cellpose_finetuning.io.annotations.write_outputs`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = ["OUTPUT_FORMATS", "check_formats", "labels_2d", "output_name", "output_stem"]

#: Output formats of ``infer``: name -> file-name ending after the image's stem.
OUTPUT_FORMATS: dict[str, str] = {
    "tif": "_masks.tif",
    "seg": "_seg.npy",
    "png": "_cp_masks.png",
    "rois": "_rois.zip",
    "geojson": ".geojson",
}


def output_stem(image_name: str) -> str:
    """The part of an image's file name that output names keep, as cellpose does.

    Only the last suffix goes (``os.path.splitext``), so ``a.1.tif`` gives
    ``a.1`` and the cellpose GUI finds ``a.1_seg.npy`` beside ``a.1.tif``.

    Examples
    --------
    >>> output_stem("a.1.tif"), output_stem("dir/t0000.ome.tif")
    ('a.1', 't0000.ome')
    """
    return os.path.splitext(os.path.basename(image_name))[0]


def output_name(image_name: str, fmt: str) -> str:
    """The file name ``infer`` writes for an image in a format (see :data:`OUTPUT_FORMATS`)."""
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInput("save", f"unknown format {fmt!r}; use {', '.join(OUTPUT_FORMATS)}")
    return output_stem(image_name) + OUTPUT_FORMATS[fmt]


def labels_2d(masks: np.ndarray, fmt: str) -> np.ndarray:
    """``masks`` as an array, checked to be 2-D non-negative integer labels for ``fmt``."""
    arr = np.asarray(masks)
    if arr.ndim != 2:
        raise InvalidInput(
            "save", f"{fmt} output is for 2-D masks; this result has shape {arr.shape} (use tif)"
        )
    if arr.dtype.kind not in "ui" or (arr.size and arr.min() < 0):
        raise InvalidInput("save", "masks must be non-negative integer labels")
    return arr


def check_formats(formats: Iterable[str]) -> list[str]:
    """Validate format names (:data:`OUTPUT_FORMATS`), keeping their order without repeats."""
    if isinstance(formats, str):
        formats = [formats]
    out: list[str] = []
    for fmt in formats:
        if fmt not in OUTPUT_FORMATS:
            raise InvalidInput(
                "save", f"unknown format {fmt!r}; use any of {', '.join(OUTPUT_FORMATS)}"
            )
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise InvalidInput("save", f"name at least one format: {', '.join(OUTPUT_FORMATS)}")
    return out
