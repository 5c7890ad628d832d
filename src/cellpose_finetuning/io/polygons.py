"""Between polygons and labels: rasterising outlines and tracing them back.

Polygons use ImageJ's and QuPath's coordinates: pixel ``(row, col)`` covers
``[col, col+1] x [row, row+1]``. A pixel belongs to an object when its centre
lies inside the polygon (even-odd rule, as both tools fill), computed with
:class:`matplotlib.path.Path`. Outlines are traced along pixel edges with
contourpy on the mask at twice its resolution, so they reproduce the masks'
pixels exactly when filled again (convex corners are cut by a quarter pixel).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = ["Ring", "Shape", "labels_to_polygons", "polygons_to_labels", "raster_shape", "ring_area"]

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


def raster_shape(path: Path, expected_shape: tuple[int, ...] | None) -> tuple[int, int]:
    """The (H, W) a polygon file is rasterised at: the paired image's, which must be given."""
    if expected_shape is None or len(expected_shape) != 2:
        raise InvalidInput(
            str(path),
            "polygon annotations are rasterised at their image's size: read them paired with "
            "a 2-D image",
        )
    return int(expected_shape[0]), int(expected_shape[1])


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


def ring_area(ring: np.ndarray) -> float:
    """Signed area of a closed ring (shoelace formula)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
