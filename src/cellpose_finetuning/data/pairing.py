"""Pairing image files with mask files, as the original service's contract describes.

Pure functions over a list of names (POSIX paths relative to a data root), so
the same code serves local folders and remote artifacts. Two forms, and both
sides of a pair of arguments must use the same one:

- **folder**: ``"images/x/"`` and ``"annotations/x/"`` (ending in ``/``): the
  image files directly in those folders pair by identical file name.
- **pattern**: ``"images/x/*.ome.tif"`` and ``"annotations/x/*_mask.ome.tif"``:
  exactly one ``*``, in the file-name part; it does not cross ``/``; files pair
  when the parts the ``*`` matched are equal (``t0000.ome.tif`` ↔
  ``t0000_mask.ome.tif``).

Only image files count (:func:`cellpose_finetuning.io.images.is_image_file`),
so a ``.geojson`` beside the masks is ignored in the folder form. In the pattern
form the annotations may also be the tools' own files
(:func:`cellpose_finetuning.io.annotations.is_annotation_file`: cellpose GUI
``_seg.npy``, QuPath ``.geojson``, ImageJ ROI ``.zip``), e.g.
``images/*.tif`` with ``annotations/*_seg.npy``; when a folder-form pairing
fails and the annotation folder holds such files, the error says so.

When both patterns list the same folder and a file matches both (``data/*.tif``
and ``data/*_mask.tif``), it belongs to the pattern with more fixed characters
(here the masks).
"""

from __future__ import annotations

import numbers
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from natsort import natsorted

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.annotations import is_annotation_file
from cellpose_finetuning.io.images import is_image_file

__all__ = [
    "Pair",
    "is_pattern",
    "pair_files",
    "resolve_n_samples",
    "safe_relpath",
    "select_samples",
    "spec_dir",
]

T = TypeVar("T")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
#: Longest path or spec accepted (S3 keys end at 1024 bytes).
MAX_PATH_CHARS = 1024
_MAX_LISTED = 10
_FORMS = (
    "a folder ending in '/' (e.g. 'images/train/') or a pattern with one '*' in the "
    "file name (e.g. 'images/train/*.tif')"
)


@dataclass(frozen=True)
class Pair:
    """One image and its mask, as names relative to the data root.

    Attributes
    ----------
    image, annotation : str
        The two files' names.
    key : str
        What they were paired by: the file name (folder form) or the part
        matched by ``*`` (pattern form).
    """

    image: str
    annotation: str
    key: str


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def safe_relpath(path: str, arg: str) -> str:
    """Normalise a relative POSIX path, refusing anything that could leave the data root.

    ``./`` and repeated slashes are removed; a trailing ``/`` is kept (it
    marks a folder); the root folder itself is ``"./"``.

    Parameters
    ----------
    path : str
        The path or pairing spec a caller gave.
    arg : str
        The argument it came from, named in errors.

    Returns
    -------
    str
        The normalised path.

    Raises
    ------
    InvalidInput
        For absolute paths, ``..`` components, URL schemes (``s3://``,
        ``file:``), backslashes, NUL characters, empty strings.

    Examples
    --------
    >>> safe_relpath("./images//train/", "train_images")
    'images/train/'
    """
    if not isinstance(path, str) or not path:
        raise InvalidInput(arg, "must be a non-empty path string")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidInput(
            arg, f"{path[:40]!r}... is {len(path)} characters, longer than {MAX_PATH_CHARS}"
        )
    if "\x00" in path or "\\" in path:
        raise InvalidInput(
            arg, f"{path!r} contains a forbidden character (backslash or NUL); use '/'"
        )
    if _SCHEME.match(path):
        raise InvalidInput(arg, f"{path!r}: URLs are not allowed here, give a path in the dataset")
    if path.startswith("/"):
        raise InvalidInput(
            arg, f"{path!r}: absolute paths are not allowed, give a path in the dataset"
        )
    parts = _parts(path)
    if ".." in parts:
        raise InvalidInput(arg, f"{path!r}: '..' is not allowed")
    norm = "/".join(parts)
    if path.endswith("/"):
        return norm + "/" if norm else "./"
    return norm


def is_pattern(spec: str) -> bool:
    """Whether a spec is in the pattern form (contains ``*``)."""
    return "*" in spec


def spec_dir(spec: str) -> str:
    """The folder a spec lists, normalised (``""`` for the root).

    Examples
    --------
    >>> spec_dir("images/train/"), spec_dir("./images/p/*_mask.tif"), spec_dir("*.png")
    ('images/train', 'images/p', '')
    """
    folder = spec.rpartition("/")[0] if is_pattern(spec) else spec
    return "/".join(_parts(folder))


def _check_spec(spec: str, arg: str) -> str:
    spec = safe_relpath(spec, arg)
    if is_pattern(spec):
        head, _, tail = spec.rpartition("/")
        if "*" in head or tail.count("*") != 1:
            raise InvalidInput(
                arg, f"{spec!r}: a pattern needs exactly one '*', in the file-name part"
            )
    elif not spec.endswith("/"):
        raise InvalidInput(arg, f"{spec!r} is neither form; give {_FORMS}")
    return spec


def _fixed_chars(spec: str) -> int:
    """How many characters of a file name a spec fixes (its specificity)."""
    return len(spec.rpartition("/")[2].replace("*", "")) if is_pattern(spec) else 0


def _select(spec: str, names: Iterable[str], *, annotations: bool = False) -> dict[str, str]:
    """Map pairing key -> name for the image (or, in the pattern form, annotation) files."""
    accept = is_annotation_file if annotations and is_pattern(spec) else is_image_file
    folder = spec_dir(spec)
    prefix = folder + "/" if folder else ""
    before, after = spec.rpartition("/")[2].split("*") if is_pattern(spec) else ("", "")
    fixed = len(before) + len(after)
    out: dict[str, str] = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        base = name[len(prefix) :]
        if not base or "/" in base or not accept(base):
            continue
        if not is_pattern(spec):
            out[base] = name
        elif len(base) > fixed and base.startswith(before) and base.endswith(after):
            out[base[len(before) : len(base) - len(after)]] = name
    return out


def _listing(names: Iterable[str]) -> str:
    names = natsorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


_TOOL_SUFFIXES = ("_seg.npy", "_rois.zip", ".zip", ".geojson")


def _tool_hint(images_spec: str, annotations_spec: str, names: list[str]) -> str:
    """For the folder form: how to pair the tools' annotation files, if the folder has some."""
    if is_pattern(annotations_spec):
        return ""
    folder = spec_dir(annotations_spec)
    prefix = folder + "/" if folder else ""
    found = natsorted(n for n in names if n.startswith(prefix) and "/" not in n[len(prefix) :])
    for name in found:
        lower = name.lower()
        suffix = next((s for s in _TOOL_SUFFIXES if lower.endswith(s)), None)
        if suffix is None:
            continue
        img_folder = spec_dir(images_spec)
        img_prefix = img_folder + "/" if img_folder else ""
        exts = natsorted(
            "." + n.rpartition(".")[2]
            for n in names
            if n.startswith(img_prefix)
            and "/" not in n[len(img_prefix) :]
            and is_image_file(n)
            and "." in n[len(img_prefix) :]
        )
        ext = exts[0] if exts else ".tif"
        return (
            f"; annotation files such as {name.rpartition('/')[2]!r} pair by pattern: give "
            f"{img_prefix + '*' + ext!r} and {prefix + '*' + name[len(name) - len(suffix) :]!r}"
        )
    return ""


def _files_in(folder: str, names: list[str]) -> int:
    prefix = folder + "/" if folder else ""
    return sum(1 for n in names if n.startswith(prefix) and "/" not in n[len(prefix) :])


def check_specs(
    images_spec: str,
    annotations_spec: str,
    *,
    images_arg: str = "train_images",
    annotations_arg: str = "train_annotations",
) -> tuple[str, str]:
    """Check two specs without listing anything: safe paths, valid forms, the same form.

    Returns
    -------
    (str, str)
        The normalised specs.

    Raises
    ------
    InvalidInput
    """
    images_spec = _check_spec(images_spec, images_arg)
    annotations_spec = _check_spec(annotations_spec, annotations_arg)
    if is_pattern(images_spec) != is_pattern(annotations_spec):
        raise InvalidInput(
            f"{images_arg}/{annotations_arg}",
            "use the same form for both: two folders ending in '/' or two patterns with '*' "
            f"(got {images_spec!r} and {annotations_spec!r})",
        )
    return images_spec, annotations_spec


def pair_files(
    images_spec: str,
    annotations_spec: str,
    names: Iterable[str],
    *,
    images_arg: str = "train_images",
    annotations_arg: str = "train_annotations",
) -> list[Pair]:
    """Pair image and mask file names by folder or by pattern.

    Parameters
    ----------
    images_spec, annotations_spec : str
        Both folders (``"images/train/"``) or both patterns
        (``"images/train/*.tif"``), relative to the data root.
    names : iterable of str
        The file names available (POSIX paths relative to the data root);
        names outside the two specs' folders are ignored.
    images_arg, annotations_arg : str
        The argument names used in error messages.

    Returns
    -------
    list of Pair
        Every image with its mask, in natural order of the key
        (``img2`` before ``img10``).

    Raises
    ------
    InvalidInput
        An unsafe or malformed spec, mixed forms, a spec that matches no
        image file, or files without a partner (listed, up to 10 per side).

    Examples
    --------
    >>> names = ["im/a.tif", "im/b.tif", "gt/a_mask.tif", "gt/b_mask.tif"]
    >>> [p.key for p in pair_files("im/*.tif", "gt/*_mask.tif", names)]
    ['a', 'b']
    """
    images_spec = _check_spec(images_spec, images_arg)
    annotations_spec = _check_spec(annotations_spec, annotations_arg)
    both = f"{images_arg}/{annotations_arg}"
    if is_pattern(images_spec) != is_pattern(annotations_spec):
        raise InvalidInput(
            both,
            f"use the same form for {images_arg} and {annotations_arg}: two folders ending "
            f"in '/' or two patterns with '*' (got {images_spec!r} and {annotations_spec!r})",
        )
    if images_spec == annotations_spec:
        raise InvalidInput(both, f"images and annotations are the same ({images_spec!r})")
    names = [n.lstrip("/") for n in names]
    images = _select(images_spec, names)
    masks = _select(annotations_spec, names, annotations=True)
    shared = set(images.values()) & set(masks.values())
    if shared:
        # Same folder, overlapping patterns: the more specific pattern keeps the file.
        spec_a, spec_m = _fixed_chars(images_spec), _fixed_chars(annotations_spec)
        if spec_a == spec_m:
            raise InvalidInput(
                both,
                f"{images_spec!r} and {annotations_spec!r} both match {_listing(shared)}; "
                "make one pattern more specific",
            )
        loser = images if spec_a < spec_m else masks
        for key in [k for k, v in loser.items() if v in shared]:
            del loser[key]
    for spec, found, arg in (
        (images_spec, images, images_arg),
        (annotations_spec, masks, annotations_arg),
    ):
        if not found:
            folder = spec_dir(spec)
            hint = _tool_hint(images_spec, spec, names) if arg == annotations_arg else ""
            raise InvalidInput(
                arg,
                f"{spec!r} matches no image files ({_files_in(folder, names)} files "
                f"directly in {folder or '.'!r}){hint}",
            )
    only_images = [images[k] for k in images.keys() - masks.keys()]
    only_masks = [masks[k] for k in masks.keys() - images.keys()]
    if only_images or only_masks:
        problems = []
        if only_images:
            problems.append(
                f"{len(only_images)} images in {images_arg} have no annotation in "
                f"{annotations_arg} ({annotations_spec!r}): {_listing(only_images)}"
            )
        if only_masks:
            problems.append(
                f"{len(only_masks)} annotations in {annotations_arg} have no image in "
                f"{images_arg} ({images_spec!r}): {_listing(only_masks)}"
            )
        raise InvalidInput(
            both, "; ".join(problems) + _tool_hint(images_spec, annotations_spec, names)
        )
    return [Pair(images[k], masks[k], k) for k in natsorted(images)]


def resolve_n_samples(n_samples: int | float, total: int) -> int:
    """How many pairs ``n_samples`` asks for out of ``total``.

    A whole number (``5``, ``5.0``) is a count; a value between 0 and 1 is a
    fraction of ``total``, rounded, at least 1 (the original service's rule).

    >>> resolve_n_samples(0.05, 100), resolve_n_samples(0.01, 10), resolve_n_samples(3, 10)
    (5, 1, 3)

    Raises
    ------
    InvalidInput
        Anything else (``1.5``, ``0``, ``-2``, a string, a bool).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Real):
        raise InvalidInput("n_samples", f"must be a number or None, got {n_samples!r}")
    if isinstance(n_samples, numbers.Integral) or float(n_samples).is_integer():
        count = int(n_samples)
        if count < 1:
            raise InvalidInput("n_samples", f"must be at least 1 or a fraction, got {n_samples}")
        return count
    if 0 < n_samples < 1:
        return max(1, round(float(n_samples) * total))
    raise InvalidInput(
        "n_samples",
        f"must be a whole number (a count) or between 0 and 1 (a fraction), got {n_samples}",
    )


def select_samples(pairs: Sequence[T], n_samples: int | float | None, seed: int) -> list[T]:
    """A reproducible random subset of ``n_samples`` pairs, kept in their original order.

    Parameters
    ----------
    pairs : sequence
        All pairs (any items), usually from :func:`pair_files`.
    n_samples : int, float or None
        How many to keep: a count, or a fraction between 0 and 1 (see
        :func:`resolve_n_samples`). ``None``, or a count at least
        ``len(pairs)``, keeps them all (asking for more than there are is not
        an error).
    seed : int
        Seed of the draw: the same seed and pairs give the same subset.

    Returns
    -------
    list
        The chosen pairs, in the order they had in ``pairs``.

    Raises
    ------
    InvalidInput
        ``n_samples`` is neither a count of at least 1 nor a fraction.
    """
    if n_samples is None:
        return list(pairs)
    n_samples = resolve_n_samples(n_samples, len(pairs))
    if n_samples < 1:
        raise InvalidInput("n_samples", f"must be at least 1, got {n_samples}")
    if n_samples >= len(pairs):
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n_samples))
    return [pairs[i] for i in keep]
