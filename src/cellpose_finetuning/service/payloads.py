"""Shapes of what the service answers, as the original service's clients read them.

- ``json_safe=True`` inference results: a transparent RGBA PNG overlay of the
  masks, base64-encoded (``{"encoding": "mask_png_base64", "width",
  "height", "object_count", "png_base64"}``), with the original's colours, so
  its web frontend draws it unchanged.
- Export metadata: ``authors`` (objects with a ``name``, optional
  ``affiliation``...) and ``uploader`` (``name`` and ``email``), checked with
  errors that name the entry.
- The default exported model name.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = [
    "MODEL_NAME",
    "default_model_name",
    "encode_mask_png",
    "normalize_authors",
    "normalize_uploader",
]

#: Exported model names: artifact aliases.
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{2,62}")
_AUTHOR_FIELDS = ("affiliation", "email", "github_user", "orcid")


def encode_mask_png(masks: np.ndarray) -> dict[str, Any]:
    """A label image as the original's browser payload: an RGBA overlay PNG.

    Object ``i`` is coloured ``(123 i, 231 i, 73 i) mod 255`` with alpha 150;
    background is transparent.

    Parameters
    ----------
    masks : numpy.ndarray
        (H, W) labels (a leading axis of size 1 is dropped).

    Returns
    -------
    dict
        ``encoding``, ``width``, ``height``, ``object_count``, ``png_base64``.
    """
    from PIL import Image

    labels = np.squeeze(np.asarray(masks))
    if labels.ndim != 2:
        raise InvalidInput("json_safe", f"needs 2D masks, got shape {labels.shape}")
    ids = labels.astype("int64", copy=False)
    rgba = np.zeros((*ids.shape, 4), "uint8")
    for channel, factor in enumerate((123, 231, 73)):
        rgba[..., channel] = (ids * factor) % 255
    rgba[..., 3] = np.where(ids > 0, 150, 0)
    rgba[ids <= 0] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG", optimize=True)
    return {
        "encoding": "mask_png_base64",
        "width": int(ids.shape[1]),
        "height": int(ids.shape[0]),
        "object_count": int(np.count_nonzero(np.unique(ids) > 0)),
        "png_base64": base64.b64encode(buffer.getvalue()).decode("ascii"),
    }


def _text(value: Any, arg: str, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidInput(arg, "must be a non-empty string" if required else "must be a string")
    return value.strip() or None


def normalize_authors(authors: Any) -> list[dict[str, str]] | None:
    """Check ``authors``: a non-empty list of objects with a ``name``.

    Plain strings are taken as names. Returns None when ``authors`` is None.
    """
    if authors is None:
        return None
    if not isinstance(authors, list | tuple) or not authors:
        raise InvalidInput("authors", "must be a non-empty list of {name, affiliation, ...}")
    out = []
    for i, author in enumerate(authors):
        if isinstance(author, str):
            author = {"name": author}
        if not isinstance(author, dict):
            raise InvalidInput(f"authors[{i}]", "must be an object with a 'name'")
        entry = {"name": _text(author.get("name"), f"authors[{i}].name", required=True)}
        for key in _AUTHOR_FIELDS:
            value = _text(author.get(key), f"authors[{i}].{key}", required=False)
            if value:
                entry[key] = value
        out.append(entry)
    return out


def normalize_uploader(uploader: Any) -> dict[str, str] | None:
    """Check ``uploader``: an object with ``name`` and ``email``."""
    if uploader is None:
        return None
    if not isinstance(uploader, dict):
        raise InvalidInput("uploader", "must be an object with 'name' and 'email'")
    name = _text(uploader.get("name"), "uploader.name", required=True)
    email = _text(uploader.get("email"), "uploader.email", required=True)
    assert name and email
    if "@" not in email:
        raise InvalidInput("uploader.email", f"{email!r} is not an email address")
    return {"name": name, "email": email}


def default_model_name(session_id: str) -> str:
    """``cellpose-<session id>``, made a valid alias (the original's default)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"cellpose-{session_id}".lower()).strip("-")
    return name[:63].rstrip("-")
