"""Pairing image files with mask files, exactly as the original service did.

Pure functions over a list of names (POSIX relative paths), so the same code
serves local folders and remote artifacts.

Two forms, both sides in the same form:

- **folder**: ``"images/x/"`` and ``"annotations/x/"`` (ending in ``/``): files
  directly in those folders pair by identical file name.
- **pattern**: ``"images/x/*.ome.tif"`` and ``"annotations/x/*_mask.ome.tif"``:
  exactly one ``*`` in the file-name part; it does not cross ``/``; the parts
  it matches must be equal (``t0000.ome.tif`` ↔ ``t0000_mask.ome.tif``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from natsort import natsorted

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.images import is_image_file

__all__ = ["Pair", "is_pattern", "pair_files", "safe_relpath", "spec_dir"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MAX_LISTED = 10


@dataclass(frozen=True)
class Pair:
    """One image and its mask, as names relative to the data root."""

    image: str
    annotation: str
    key: str


def safe_relpath(path: str, arg: str) -> str:
    """Normalise a relative POSIX path, refusing anything that could escape the root.

    Raises
    ------
    InvalidInput
        For absolute paths, ``..`` components, URL schemes, backslashes, NUL.
    """
    if not isinstance(path, str) or not path:
        raise InvalidInput(arg, "must be a non-empty path string")
    if "\x00" in path or "\\" in path:
        raise InvalidInput(arg, f"{path!r} contains a forbidden character")
    if _SCHEME.match(path):
        raise InvalidInput(arg, f"{path!r}: URLs are not allowed here, give a path in the dataset")
    if path.startswith("/"):
        raise InvalidInput(arg, f"{path!r}: absolute paths are not allowed")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(arg, f"{path!r}: '..' is not allowed")
    norm = "/".join(parts)
    return norm + "/" if path.endswith("/") and norm else norm


def is_pattern(spec: str) -> bool:
    """Whether a spec is the pattern form (contains ``*``)."""
    return "*" in spec


def _check_spec(spec: str, arg: str) -> str:
    spec = safe_relpath(spec, arg)
    if is_pattern(spec):
        head, _, tail = spec.rpartition("/")
        if "*" in head or tail.count("*") != 1:
            raise InvalidInput(
                arg, f"{spec!r}: a pattern needs exactly one '*', in the file name part"
            )
    elif not spec.endswith("/"):
        raise InvalidInput(
            arg,
            f"{spec!r} is neither a folder (ending in '/') nor a pattern with '*' "
            "(e.g. 'images/train/' or 'images/train/*.tif')",
        )
    return spec


def spec_dir(spec: str) -> str:
    """The folder a spec lists (``""`` for the root)."""
    return spec.rstrip("/") if not is_pattern(spec) else spec.rpartition("/")[0]


def _keys(spec: str, names: Iterable[str]) -> dict[str, str]:
    """Map pairing key -> name for the names a spec selects."""
    folder = spec_dir(spec)
    prefix = folder + "/" if folder else ""
    out: dict[str, str] = {}
    if is_pattern(spec):
        before, after = spec.rpartition("/")[2].split("*")
        for name in names:
            if not name.startswith(prefix):
                continue
            base = name[len(prefix) :]
            if "/" in base or not is_image_file(base):
                continue
            if (
                base.startswith(before)
                and base.endswith(after)
                and len(base) >= len(before) + len(after)
            ):
                out[base[len(before) : len(base) - len(after)]] = name
    else:
        for name in names:
            if name.startswith(prefix) and "/" not in name[len(prefix) :]:
                base = name[len(prefix) :]
                if base and is_image_file(base):
                    out[base] = name
    return out


def _listing(names: list[str]) -> str:
    shown = ", ".join(natsorted(names)[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def pair_files(
    images_spec: str,
    annotations_spec: str,
    names: Iterable[str],
    *,
    images_arg: str = "train_images",
    annotations_arg: str = "train_annotations",
) -> list[Pair]:
    """Pair image and mask names.

    Parameters
    ----------
    images_spec, annotations_spec : str
        Both folders (``".../"``) or both patterns (``".../*.tif"``).
    names : iterable of str
        All file names available (relative POSIX paths); others are ignored.
    images_arg, annotations_arg : str
        Argument names used in error messages.

    Returns
    -------
    list of Pair
        Naturally sorted by key.

    Raises
    ------
    InvalidInput
        Mixed forms, a spec matching nothing, or unmatched files (listed).
    """
    images_spec = _check_spec(images_spec, images_arg)
    annotations_spec = _check_spec(annotations_spec, annotations_arg)
    if is_pattern(images_spec) != is_pattern(annotations_spec):
        raise InvalidInput(
            f"{images_arg}/{annotations_arg}",
            "use the same form for both: two folders ending in '/' or two patterns with '*' "
            f"(got {images_spec!r} and {annotations_spec!r})",
        )
    names = [n.lstrip("/") for n in names]
    images = _keys(images_spec, names)
    masks = _keys(annotations_spec, names)
    if images_spec == annotations_spec or set(images.values()) & set(masks.values()):
        raise InvalidInput(annotations_arg, "images and annotations select the same files")
    for spec, found, arg in (
        (images_spec, images, images_arg),
        (annotations_spec, masks, annotations_arg),
    ):
        if not found:
            folder = spec_dir(spec)
            prefix = folder + "/" if folder else ""
            present = sum(1 for n in names if n.startswith(prefix) and "/" not in n[len(prefix) :])
            raise InvalidInput(
                arg, f"{spec!r} matches no image files ({present} files in {folder or '.'!r})"
            )
    only_images = [images[k] for k in images.keys() - masks.keys()]
    only_masks = [masks[k] for k in masks.keys() - images.keys()]
    if only_images or only_masks:
        parts = []
        if only_images:
            parts.append(
                f"{len(only_images)} images without annotation in "
                f"{annotations_arg}: {_listing(only_images)}"
            )
        if only_masks:
            parts.append(
                f"{len(only_masks)} annotations without image in "
                f"{images_arg}: {_listing(only_masks)}"
            )
        raise InvalidInput(f"{images_arg}/{annotations_arg}", "; ".join(parts))
    return [Pair(images[k], masks[k], k) for k in natsorted(images)]


def join(root: str, name: str) -> str:
    """Join POSIX path parts (no normalisation beyond posixpath.join)."""
    return posixpath.join(root, name)
