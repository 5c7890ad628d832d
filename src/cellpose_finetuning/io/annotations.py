"""Annotations in the formats biologists' tools write, and results back out to them.

Reading (into instance labels, then checked by
:func:`~cellpose_finetuning.io.images.validate_mask`):

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

import itertools
import json
import os
import pickle
import tempfile
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = [
    "ANNOTATION_SUFFIXES",
    "OUTPUT_FORMATS",
    "annotation_kind",
    "check_formats",
    "encode_outputs",
    "is_annotation_file",
    "labels_to_polygons",
    "output_name",
    "output_stem",
    "polygons_to_labels",
    "read_annotation_bytes",
    "read_annotation_labels",
    "read_seg_npy",
    "write_geojson",
    "write_imagej_rois",
    "write_outputs",
    "write_seg_npy",
]

#: Suffixes read only as annotations (besides the image suffixes).
POLYGON_SUFFIXES: tuple[str, ...] = (".geojson", ".zip")
#: Every suffix :func:`~cellpose_finetuning.io.images.read_mask` accepts (lower case).
ANNOTATION_SUFFIXES: tuple[str, ...] = (
    ".ome.tif",
    ".ome.tiff",
    ".tif",
    ".tiff",
    ".png",
    ".jpg",
    ".jpeg",
    ".npy",
    *POLYGON_SUFFIXES,
)
#: Output formats of ``infer``: name -> file-name ending after the image's stem.
OUTPUT_FORMATS: dict[str, str] = {
    "tif": "_masks.tif",
    "seg": "_seg.npy",
    "png": "_cp_masks.png",
    "rois": "_rois.zip",
    "geojson": ".geojson",
}
_GEOJSON_OBJECT_TYPES = ("detection", "cell")
# ROI types that enclose an area (roifile.ROI_TYPE names).
_AREA_ROIS = {"POLYGON", "RECT", "OVAL", "FREEHAND", "TRACED"}


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


# ------------------------------------------------------------------ safe _seg.npy


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars and plain containers; nothing else."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: a _seg.npy holds only numpy arrays and "
            "plain values, this file would run other code"
        )


def _npy_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh, max_header_size=100_000)
    return np.lib.format.read_array_header_2_0(fh, max_header_size=100_000)


def npy_holds_objects(path: str | os.PathLike[str]) -> bool:
    """Whether a ``.npy`` file holds pickled Python objects (a ``_seg.npy`` does)."""
    try:
        with open(path, "rb") as fh:
            return bool(_npy_header(fh)[2].hasobject)
    except Exception:  # not a .npy at all: the ordinary reader names the problem
        return False


def read_seg_npy(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a cellpose GUI ``_seg.npy`` without running code from it.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    dict
        Its entries (``masks``, ``outlines``, ``flows``, ...).

    Raises
    ------
    InvalidInput
        Naming the file: not a ``.npy``, a pickle that asks for anything but
        numpy arrays and plain values (it is refused before it runs), not a dict.
    """
    name = str(path)
    try:
        with open(path, "rb") as fh:
            _shape, _fortran, dtype = _npy_header(fh)
            if not dtype.hasobject:
                raise InvalidInput(name, "is a plain array, not a cellpose _seg.npy dictionary")
            obj = _RestrictedUnpickler(fh).load()
    except InvalidInput:
        raise
    except pickle.UnpicklingError as exc:
        raise InvalidInput(name, f"unsafe or corrupt _seg.npy: {exc}") from None
    except Exception as exc:
        raise InvalidInput(name, f"cannot read _seg.npy ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise InvalidInput(
            name, f"holds a {type(obj).__name__}, not a cellpose _seg.npy dictionary"
        )
    return obj


def _seg_masks(path: Path) -> np.ndarray:
    dat = read_seg_npy(path)
    if "masks" not in dat:
        keys = ", ".join(sorted(map(str, dat))) or "none"
        raise InvalidInput(
            str(path), f"this _seg.npy has no 'masks' entry (keys: {keys}); save it from the GUI"
        )
    masks = dat["masks"]
    if not isinstance(masks, np.ndarray):
        raise InvalidInput(str(path), f"'masks' is a {type(masks).__name__}, not an array")
    masks = np.squeeze(masks) if masks.ndim > 2 and 1 in masks.shape[:-2] else masks
    # The GUI marks "no mask" as -1 in some versions (it adds 1 when loading).
    if masks.dtype.kind == "i" and masks.size and masks.min() == -1:
        masks = masks + 1
    return masks


# ------------------------------------------------------------------ polygons -> labels

Ring = np.ndarray  # (N, 2) x, y in corner coordinates
Shape = list[Ring]  # rings of one object, combined by the even-odd rule


def _ring_mask(ring: Ring, shape: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """Pixels whose centres are inside a ring, within its bounding box: (mask, row0, col0)."""
    from matplotlib.path import Path as MplPath

    h, w = shape
    x0 = max(int(np.floor(ring[:, 0].min())), 0)
    x1 = min(int(np.ceil(ring[:, 0].max())), w)
    y0 = max(int(np.floor(ring[:, 1].min())), 0)
    y1 = min(int(np.ceil(ring[:, 1].max())), h)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), bool), y0, x0
    cols, rows = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
    centres = np.column_stack([cols.ravel(), rows.ravel()])
    inside = MplPath(ring, closed=False).contains_points(centres)
    return inside.reshape(y1 - y0, x1 - x0), y0, x0


def polygons_to_labels(
    objects: Sequence[Shape], shape: tuple[int, int], name: str = "annotations"
) -> np.ndarray:
    """Rasterise objects (each a list of rings) to labels 1..N in the given order.

    Parameters
    ----------
    objects : sequence of list of (N, 2) arrays
        Each object's rings (x, y in ImageJ/QuPath pixel-corner coordinates),
        combined by the even-odd rule (so holes are holes).
    shape : (int, int)
        Height and width of the label image.
    name : str
        File name for errors.

    Returns
    -------
    numpy.ndarray
        int64 labels; object ``k`` is label ``k + 1``; later objects win overlaps.

    Raises
    ------
    InvalidInput
        Naming ``name``: coordinates outside the image.
    """
    h, w = (int(s) for s in shape)
    labels = np.zeros((h, w), "int64")
    for k, rings in enumerate(objects):
        for ring in rings:
            xs, ys = ring[:, 0], ring[:, 1]
            if not (np.all(np.isfinite(ring))):
                raise InvalidInput(name, f"object {k + 1} has coordinates that are not numbers")
            if xs.min() < -1e-6 or ys.min() < -1e-6 or xs.max() > w + 1e-6 or ys.max() > h + 1e-6:
                raise InvalidInput(
                    name,
                    f"object {k + 1} has coordinates outside the {h}x{w} image "
                    f"(x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}); "
                    "was it drawn on another image?",
                )
        obj = np.zeros((h, w), bool)
        for ring in rings:
            inside, r0, c0 = _ring_mask(ring, (h, w))
            obj[r0 : r0 + inside.shape[0], c0 : c0 + inside.shape[1]] ^= inside
        labels[obj] = k + 1
    return labels


def _need_shape(path: Path, expected_shape: tuple[int, ...] | None) -> tuple[int, int]:
    if expected_shape is None or len(expected_shape) != 2:
        raise InvalidInput(
            str(path),
            "polygon annotations are rasterised at their image's size: read them paired with "
            "a 2-D image",
        )
    return int(expected_shape[0]), int(expected_shape[1])


def _rings_of(geometry: Any, name: str, k: int) -> list[Shape]:
    """Shapes of one GeoJSON geometry (a MultiPolygon gives several, a collection recurses)."""
    if not isinstance(geometry, dict):
        return []
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        out: list[Shape] = []
        for g in geometry.get("geometries") or []:
            out += _rings_of(g, name, k)
        return out
    coords = geometry.get("coordinates")
    polys = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else None
    if polys is None:
        return []
    shapes = []
    for poly in polys:
        try:
            rings = [np.asarray(r, dtype="float64")[:, :2] for r in poly]
        except Exception:
            raise InvalidInput(name, f"feature {k + 1}: malformed {kind} coordinates") from None
        rings = [r for r in rings if r.ndim == 2 and len(r) >= 3]
        if rings:
            shapes.append(rings)
    return shapes


def _read_geojson(path: Path, shape: tuple[int, int]) -> np.ndarray:
    name = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:
        raise InvalidInput(name, f"cannot read GeoJSON ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, list):  # QuPath before 0.4 exports a bare list of features
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise InvalidInput(name, "is not GeoJSON (no FeatureCollection, Feature or geometry)")
    found: list[tuple[str, list[Shape]]] = []
    kinds: dict[str, int] = {}
    for k, feat in enumerate(features):
        if not isinstance(feat, dict):
            continue
        geom = feat.get("geometry")
        kinds[str((geom or {}).get("type"))] = kinds.get(str((geom or {}).get("type")), 0) + 1
        shapes = _rings_of(geom, name, k)
        if shapes:
            props = feat.get("properties") or {}
            found.append((str(props.get("objectType", "annotation")).lower(), shapes))
    if not found:
        seen = ", ".join(f"{n} {t}" for t, n in kinds.items()) or "no features"
        raise InvalidInput(
            name, f"has no polygons to use as objects (found {seen}); export areas, not points"
        )
    if any(t in _GEOJSON_OBJECT_TYPES for t, _ in found):
        found = [f for f in found if f[0] in _GEOJSON_OBJECT_TYPES]
    # A MultiPolygon is one object with several parts.
    objects = [[ring for shape in shapes for ring in shape] for _, shapes in found]
    return polygons_to_labels(objects, shape, name)


def _read_rois(path: Path, shape: tuple[int, int]) -> np.ndarray:
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
        return _seg_masks(path) if npy_holds_objects(path) else None
    if kind == "geojson":
        return _read_geojson(path, _need_shape(path, expected_shape))
    if kind == "rois":
        return _read_rois(path, _need_shape(path, expected_shape))
    return None


# ------------------------------------------------------------------ labels -> polygons


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove vertices in the middle of straight runs (ring given without repeat)."""
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    cross = (ring[:, 0] - prev[:, 0]) * (nxt[:, 1] - ring[:, 1]) - (ring[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - ring[:, 0]
    )
    keep = np.abs(cross) > 1e-9
    return ring[keep] if keep.sum() >= 3 else ring


def labels_to_polygons(masks: np.ndarray) -> list[tuple[int, list[list[np.ndarray]]]]:
    """Trace every object's outline along pixel edges.

    Parameters
    ----------
    masks : numpy.ndarray
        (H, W) labels, 0 = background.

    Returns
    -------
    list of (int, list of list of (N, 2) arrays)
        For each label: its polygons (several when it falls apart into pieces),
        each as [exterior, hole, ...] rings of x, y in pixel-corner
        coordinates, closed (first vertex repeated).
    """
    import contourpy
    from scipy import ndimage

    masks = np.asarray(masks)
    out = []
    slices = ndimage.find_objects(masks.astype("int64", copy=False))
    for idx, sl in enumerate(slices):
        if sl is None:
            continue
        label = idx + 1
        r0, c0 = sl[0].start, sl[1].start
        sub = np.pad(masks[sl] == label, 1)
        up = sub.repeat(2, 0).repeat(2, 1).astype("float64")
        gen = contourpy.contour_generator(z=up, fill_type=contourpy.FillType.OuterOffset)
        points, offsets = gen.filled(0.5, 2.0)
        polys = []
        for pts, offs in zip(points, offsets, strict=True):
            rings = []
            for a, b in itertools.pairwise(offs):
                ring = pts[a:b]
                if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
                    ring = ring[:-1]
                # (u + 0.5) / 2 maps the doubled grid's index to pixel-corner coordinates.
                ring = (ring + 0.5) / 2 + [c0 - 1, r0 - 1]
                ring = _drop_collinear(ring)
                rings.append(np.vstack([ring, ring[:1]]))
            if rings:
                polys.append(rings)
        if polys:
            out.append((label, polys))
    return out


# ------------------------------------------------------------------ writing


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


def _flows_from_masks(masks: np.ndarray) -> list[np.ndarray]:
    """Flows in cellpose's layout for masks that come without the network's flows.

    The cell probability is +5 inside objects and -5 outside; the XY flows are
    zero (cellpose computes true flows from masks by diffusion, seconds per
    image on a CPU, and the GUI only shows them). Pass the network's flows to
    :func:`write_seg_npy` when you have them.
    """
    h, w = masks.shape
    return [
        np.zeros((h, w, 3), "uint8"),
        np.zeros((2, h, w), "float32"),
        np.where(masks > 0, 5.0, -5.0).astype("float32"),
    ]


def _image_for_seg(image: np.ndarray | None, masks: np.ndarray) -> np.ndarray:
    if image is None:
        return np.zeros(masks.shape, "float32")
    img = np.asarray(image)
    return img[0] if img.ndim == 3 and img.shape[0] == 1 else img


def write_seg_npy(
    out_dir: str | os.PathLike[str],
    image_name: str,
    masks: np.ndarray,
    image: np.ndarray | None = None,
    flows: list[np.ndarray] | None = None,
) -> Path:
    """Write ``<stem>_seg.npy`` with cellpose's own ``io.masks_flows_to_seg``.

    ``flows`` are ``model.eval``'s flows when given; otherwise flows made from
    the masks (see :func:`_flows_from_masks`). The GUI opens the file when its
    image lies beside it (its ``filename`` is the image's name in ``out_dir``):
    open the image in the GUI, or drop the ``_seg.npy`` on it.
    """
    from cellpose import io as cp_io

    masks = _two_d(masks, "seg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(image_name)
    file_name = str(out_dir / (stem + os.path.splitext(image_name)[1]))
    cp_io.masks_flows_to_seg(
        _image_for_seg(image, masks), masks, flows or _flows_from_masks(masks), file_name
    )
    return out_dir / f"{stem}_seg.npy"


def write_cp_masks_png(out_dir: str | os.PathLike[str], image_name: str, masks: np.ndarray) -> Path:
    """Write ``<stem>_cp_masks.png`` (16-bit) with cellpose's ``io.save_masks``."""
    from cellpose import io as cp_io

    masks = _two_d(masks, "png")
    if masks.max() > 65535:
        raise InvalidInput("save", "more than 65535 objects do not fit in a 16-bit PNG; use tif")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(image_name)
    target = out_dir / f"{stem}_cp_masks.png"
    if masks.max() == 0:
        # save_masks writes nothing for an empty result; its own imsave writes the empty PNG.
        cp_io.imsave(str(target), masks.astype("uint16"))
    else:
        cp_io.save_masks(
            None,
            masks.astype("uint16"),
            None,
            str(out_dir / image_name),
            png=True,
            tif=False,
            savedir=str(out_dir),
        )
    return target


def write_imagej_rois(
    path: str | os.PathLike[str], masks: np.ndarray, polygons: Any = None
) -> Path:
    """Write an ImageJ ROI set (``.zip``) with ``roifile``: one polygon ROI per object.

    ROIs are named by label (``0001``...). An object in several pieces keeps its
    largest piece (ImageJ ROIs in a set are single polygons).
    """
    from roifile import ImagejRoi, roiwrite

    masks = _two_d(masks, "rois")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    polygons = labels_to_polygons(masks) if polygons is None else polygons
    width = max(4, len(str(int(masks.max()))))
    rois = []
    for label, polys in polygons:
        exterior = max((p[0] for p in polys), key=lambda r: abs(_area(r)))
        rois.append(ImagejRoi.frompoints(exterior[:-1], name=f"{label:0{width}d}"))
    if path.exists():
        path.unlink()  # roiwrite appends to an existing zip
    if rois:
        roiwrite(path, rois, mode="w")
    else:
        zipfile.ZipFile(path, "w").close()
    return path


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def write_geojson(path: str | os.PathLike[str], masks: np.ndarray, polygons: Any = None) -> Path:
    """Write objects as QuPath exports them: a FeatureCollection of detection Polygons.

    Each feature has a stable ``id`` (a UUID from the label), ``objectType``
    ``"detection"`` and the label as ``name``; an object in several pieces is a
    MultiPolygon. Import in QuPath with File > Import objects from file (or drag
    the file onto the image).
    """
    masks = _two_d(masks, "geojson")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    polygons = labels_to_polygons(masks) if polygons is None else polygons
    features = []
    for label, polys in polygons:
        coords = [[np.round(r, 4).tolist() for r in rings] for rings in polys]
        geometry = (
            {"type": "Polygon", "coordinates": coords[0]}
            if len(coords) == 1
            else {"type": "MultiPolygon", "coordinates": coords}
        )
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cellpose-finetuning/{label}")),
                "geometry": geometry,
                "properties": {"objectType": "detection", "name": str(label), "isLocked": False},
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _two_d(masks: np.ndarray, fmt: str) -> np.ndarray:
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


def write_outputs(
    out_dir: str | os.PathLike[str],
    image_name: str,
    masks: np.ndarray,
    formats: Iterable[str] = ("tif",),
    image: np.ndarray | None = None,
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

    Returns
    -------
    dict
        Format -> file written.
    """
    from cellpose_finetuning.io.images import write_mask

    formats = check_formats(formats)
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    polygons = None
    if {"rois", "geojson"} & set(formats):
        polygons = labels_to_polygons(_two_d(masks, "rois" if "rois" in formats else "geojson"))
    for fmt in formats:
        target = out_dir / output_name(image_name, fmt)
        if fmt == "tif":
            out[fmt] = write_mask(target, masks)
        elif fmt == "seg":
            out[fmt] = write_seg_npy(out_dir, image_name, masks, image)
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
    from cellpose_finetuning.io.images import read_mask

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
