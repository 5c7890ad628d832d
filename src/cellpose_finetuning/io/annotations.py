"""Annotations in the formats biologists' tools write, and results back out to them.

Reading (into instance labels, then checked by
:func:`~cellpose_finetuning.io.masks.validate_mask`):

- **cellpose GUI** ``_seg.npy``: its ``masks`` entry. These files are pickles;
  they are read with a restricted unpickler that builds only numpy arrays,
  dtypes, numpy scalars and plain containers (dict, list, tuple, str, numbers,
  None), so a crafted file cannot run code. Any ``.npy`` holding a pickled
  dict is read this way; plain ``.npy`` arrays are read as before.
- **QuPath GeoJSON** (``.geojson``): Polygon and MultiPolygon features (holes
  honoured), rasterised at the paired image's size. When the file has
  detections or cells, only those are used (a QuPath project usually also has a
  large region annotation around them); otherwise every polygon is an object.
- **Fiji/ImageJ ROI sets** (``.zip`` of ``.roi``, read with ``roifile``):
  polygon, freehand, traced, rectangle, oval and composite ROIs, rasterised
  likewise. Line and point ROIs are skipped.
- 8- and 16-bit label PNGs (``_masks.png``, ``_cp_masks.png``) are ordinary
  masks, read by :mod:`cellpose_finetuning.io.images`.

Polygons use ImageJ's and QuPath's coordinates: pixel ``(row, col)`` covers
``[col, col+1] x [row, row+1]``. A pixel belongs to an object when its centre
lies inside the polygon (even-odd rule, as both tools fill), computed with
:class:`matplotlib.path.Path`. Objects are numbered in file order; a later
object overlapping an earlier one wins the shared pixels.

Writing (:func:`write_outputs`): cellpose's own writers for ``_seg.npy``
(``io.masks_flows_to_seg``, which the GUI opens) and ``_cp_masks.png``
(``io.save_masks``); ``roifile`` for ``_rois.zip``; GeoJSON as QuPath exports
it (a FeatureCollection of detections). Outlines are traced along pixel edges
with contourpy (matplotlib's contouring engine) on the mask at twice its
resolution, so they reproduce the masks' pixels exactly when filled again
(convex corners are cut by a quarter pixel).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.geojson import read_geojson_labels, write_geojson
from cellpose_finetuning.io.image_files import SUPPORTED_IMAGE_SUFFIXES
from cellpose_finetuning.io.imagej_rois import read_roi_labels, write_imagej_rois
from cellpose_finetuning.io.output_names import (
    OUTPUT_FORMATS,
    check_formats,
    labels_2d,
    output_name,
    output_stem,
)
from cellpose_finetuning.io.polygons import labels_to_polygons, polygons_to_labels, raster_shape
from cellpose_finetuning.io.seg_npy import (
    npy_holds_objects,
    read_seg_npy,
    seg_masks,
    write_cp_masks_png,
    write_seg_npy,
)

# Each format lives in its own module (seg_npy, geojson, imagej_rois; polygons
# for the geometry, output_names for file names); this module picks the reader
# or writers by name, and its names stay importable from here.
__all__ = [
    "ANNOTATION_SUFFIXES",
    "OUTPUT_FORMATS",
    "annotation_kind",
    "check_formats",
    "encode_outputs",
    "is_annotation_file",
    "labels_to_polygons",
    "npy_holds_objects",
    "output_name",
    "output_stem",
    "polygons_to_labels",
    "read_annotation_bytes",
    "read_annotation_labels",
    "read_seg_npy",
    "write_cp_masks_png",
    "write_geojson",
    "write_imagej_rois",
    "write_outputs",
    "write_seg_npy",
]

#: Suffixes read only as annotations (besides the image suffixes).
POLYGON_SUFFIXES: tuple[str, ...] = (".geojson", ".zip")
#: Every suffix :func:`~cellpose_finetuning.io.masks.read_mask` accepts (lower case).
ANNOTATION_SUFFIXES: tuple[str, ...] = (*SUPPORTED_IMAGE_SUFFIXES, *POLYGON_SUFFIXES)


def is_annotation_file(name: str | os.PathLike[str]) -> bool:
    """Whether a file name has a suffix :func:`read_mask` reads (case-insensitive).

    Examples
    --------
    >>> [is_annotation_file(n) for n in ("a_seg.npy", "a.geojson", "a.csv")]
    [True, True, False]
    """
    return os.fspath(name).lower().endswith(ANNOTATION_SUFFIXES)


def annotation_kind(name: str | os.PathLike[str]) -> str:
    """``"geojson"``, ``"rois"``, ``"npy"`` or ``"image"``, from the file name."""
    lower = os.fspath(name).lower()
    if lower.endswith(".geojson"):
        return "geojson"
    if lower.endswith(".zip"):
        return "rois"
    if lower.endswith(".npy"):
        return "npy"
    return "image"


def read_annotation_labels(
    path: str | os.PathLike[str], expected_shape: tuple[int, ...] | None = None
) -> np.ndarray | None:
    """Labels from a tool's annotation file, or None for an ordinary mask image.

    Parameters
    ----------
    path : path-like
        ``.geojson``, ``.zip`` (ImageJ ROI set) or a ``.npy`` holding a
        pickled cellpose dictionary; anything else gives None.
    expected_shape : tuple of int, optional
        The paired image's (H, W): needed for the polygon formats.

    Returns
    -------
    numpy.ndarray or None
        Raw labels (not yet renumbered or checked).

    Raises
    ------
    InvalidInput
        Naming the file.
    """
    path = Path(path)
    kind = annotation_kind(path.name)
    if kind == "npy":
        return seg_masks(path) if npy_holds_objects(path) else None
    if kind == "geojson":
        return read_geojson_labels(path, raster_shape(path, expected_shape))
    if kind == "rois":
        return read_roi_labels(path, raster_shape(path, expected_shape))
    return None


def write_outputs(
    out_dir: str | os.PathLike[str],
    image_name: str,
    masks: np.ndarray,
    formats: Iterable[str] = ("tif",),
    image: np.ndarray | None = None,
    flows: list[np.ndarray] | None = None,
) -> dict[str, Path]:
    """Write an image's masks in the chosen formats.

    Parameters
    ----------
    out_dir : path-like
        Target folder (created).
    image_name : str
        The segmented image's file name; outputs keep its whole stem
        (:func:`output_stem`): ``a.1.tif`` -> ``a.1_masks.tif``.
    masks : numpy.ndarray
        Labels; formats other than ``tif`` need 2-D masks.
    formats : iterable of str
        Any of :data:`OUTPUT_FORMATS`.
    image : numpy.ndarray, optional
        The image, stored in ``_seg.npy`` writers' calls (cellpose's writer takes it).
    flows : list of numpy.ndarray, optional
        The network's flows for ``_seg.npy`` (cellpose's ``[HSV picture, dP,
        cell probability]``, as ``infer`` with ``return_flows`` gives them), so
        the GUI shows them; without them the file's XY flows are zero.

    Returns
    -------
    dict
        Format -> file written.
    """
    from cellpose_finetuning.io.masks import write_mask

    formats = check_formats(formats)
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    polygons = None
    if {"rois", "geojson"} & set(formats):
        polygons = labels_to_polygons(labels_2d(masks, "rois" if "rois" in formats else "geojson"))
    for fmt in formats:
        target = out_dir / output_name(image_name, fmt)
        if fmt == "tif":
            out[fmt] = write_mask(target, masks)
        elif fmt == "seg":
            out[fmt] = write_seg_npy(out_dir, image_name, masks, image, flows)
        elif fmt == "png":
            out[fmt] = write_cp_masks_png(out_dir, image_name, masks)
        elif fmt == "rois":
            out[fmt] = write_imagej_rois(target, masks, polygons)
        else:
            out[fmt] = write_geojson(target, masks, polygons)
    return out


def encode_outputs(
    masks: np.ndarray, image_name: str, formats: Iterable[str] = ("tif",)
) -> dict[str, bytes]:
    """The files :func:`write_outputs` would write, as bytes by file name (for downloads)."""
    with tempfile.TemporaryDirectory() as tmp:
        written = write_outputs(tmp, image_name, masks, formats)
        return {p.name: p.read_bytes() for p in written.values()}


def read_annotation_bytes(
    file_name: str,
    data: bytes,
    image_shape: Sequence[int] | None = None,
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Read an annotation file given as bytes (as :func:`read_mask`); errors name ``file_name``.

    Parameters
    ----------
    file_name : str
        The file's name (its suffix picks the reader); only the last path part is used.
    data : bytes
        The file's content.
    image_shape : sequence of int, optional
        The paired image's (H, W), needed for ``.geojson`` and ``.zip``.
    max_pixels : int, optional
        Limit on the values a file declares.

    Returns
    -------
    numpy.ndarray
        Renumbered labels, uint16 (uint32 above 65535 objects).

    Raises
    ------
    InvalidInput
        Naming ``file_name``.
    """
    from cellpose_finetuning.io.masks import read_mask

    if not isinstance(file_name, str) or not file_name.strip():
        raise InvalidInput("file_name", "must be a file name such as 'a_seg.npy'")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput("data", f"must be the file's bytes, got {type(data).__name__}")
    base = os.path.basename(file_name.replace("\\", "/")) or "annotation"
    shape = None if image_shape is None else tuple(int(s) for s in image_shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / base
        path.write_bytes(bytes(data))
        try:
            return read_mask(path, expected_shape=shape, max_pixels=max_pixels)
        except InvalidInput as exc:
            what = file_name if exc.what == str(path) else exc.what
            raise InvalidInput(what, exc.reason.replace(str(path), file_name)) from None
