"""QuPath GeoJSON: Polygon and MultiPolygon features to labels, and labels back to detections.

Reading rasterises features at the paired image's size (holes honoured).
When the file has detections or cells, only those are used (a QuPath project
usually also has a large region annotation around them); otherwise every
polygon is an object. Writing gives a FeatureCollection of detections, as
QuPath exports it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.output_names import labels_2d
from cellpose_finetuning.io.polygons import Shape, labels_to_polygons, polygons_to_labels

__all__ = ["read_geojson_labels", "write_geojson"]

_GEOJSON_OBJECT_TYPES = ("detection", "cell")


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


def read_geojson_labels(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Labels from a QuPath GeoJSON file, rasterised at ``shape`` (detections/cells if any)."""
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


def write_geojson(path: str | os.PathLike[str], masks: np.ndarray, polygons: Any = None) -> Path:
    """Write objects as QuPath exports them: a FeatureCollection of detection Polygons.

    Each feature has a stable ``id`` (a UUID from the label), ``objectType``
    ``"detection"`` and the label as ``name``; an object in several pieces is a
    MultiPolygon. Import in QuPath with File > Import objects from file (or drag
    the file onto the image).
    """
    masks = labels_2d(masks, "geojson")
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
