"""Fiji/ImageJ ROI sets (``.zip`` of ``.roi``, with ``roifile``): to labels and back.

Polygon, freehand, traced, rectangle, oval and composite ROIs are
rasterised at the paired image's size; line and point ROIs are skipped.
Writing gives one polygon ROI per object.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.output_names import labels_2d
from cellpose_finetuning.io.polygons import Shape, labels_to_polygons, polygons_to_labels, ring_area

__all__ = ["read_roi_labels", "write_imagej_rois"]

# ROI types that enclose an area (roifile.ROI_TYPE names).
_AREA_ROIS = {"POLYGON", "RECT", "OVAL", "FREEHAND", "TRACED"}


def read_roi_labels(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Labels from an ImageJ ROI set (``.zip``) rasterised at ``shape``; lines, points skipped."""
    from roifile import ROI_TYPE, ImagejRoi

    name = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:
        raise InvalidInput(
            name, f"is not an ImageJ ROI set (.zip of .roi files): {type(exc).__name__}: {exc}"
        ) from None
    objects: list[Shape] = []
    skipped = 0
    with archive:
        entries = [i for i in archive.infolist() if not i.is_dir()]
        if not entries:
            raise InvalidInput(name, "the ROI set is empty")
        for info in entries:
            try:
                roi = ImagejRoi.frombytes(archive.read(info))
                kind = ROI_TYPE(roi.roitype).name
                rings = (
                    roi.coordinates(multi=True)
                    if roi.multi_coordinates is not None
                    else [roi.coordinates()]
                )
            except Exception as exc:
                raise InvalidInput(
                    name,
                    f"entry {info.filename!r} is not a readable ImageJ ROI "
                    f"({type(exc).__name__}: {exc})",
                ) from None
            if kind not in _AREA_ROIS and roi.multi_coordinates is None:
                skipped += 1
                continue
            rings = [np.asarray(r, "float64")[:, :2] for r in rings if len(r) >= 3]
            if rings:
                objects.append(rings)
    if not objects:
        raise InvalidInput(
            name, f"has no area ROIs ({skipped} line or point ROIs); draw or export outlines"
        )
    return polygons_to_labels(objects, shape, name)


def write_imagej_rois(
    path: str | os.PathLike[str], masks: np.ndarray, polygons: Any = None
) -> Path:
    """Write an ImageJ ROI set (``.zip``) with ``roifile``: one polygon ROI per object.

    ROIs are named by label (``0001``...). An object in several pieces keeps its
    largest piece (ImageJ ROIs in a set are single polygons).
    """
    from roifile import ImagejRoi, roiwrite

    masks = labels_2d(masks, "rois")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    polygons = labels_to_polygons(masks) if polygons is None else polygons
    width = max(4, len(str(int(masks.max()))))
    rois = []
    for label, polys in polygons:
        exterior = max((p[0] for p in polys), key=lambda r: abs(ring_area(r)))
        rois.append(ImagejRoi.frompoints(exterior[:-1], name=f"{label:0{width}d}"))
    if path.exists():
        path.unlink()  # roiwrite appends to an existing zip
    if rois:
        roiwrite(path, rois, mode="w")
    else:
        zipfile.ZipFile(path, "w").close()
    return path
