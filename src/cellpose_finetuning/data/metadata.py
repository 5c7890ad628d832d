"""Pairing from metadata files: the original service's ``metadata_dir``.

Instead of two folders or two patterns, a dataset may describe its pairs in
JSON files (for example those written by annotation tools). Every ``*.json``
file below ``metadata_dir`` is read; in each, the records are found wherever
they sit (a list at the top, or under ``records``/``items``/``samples``/
``entries``/``data``, or nested deeper): a record is a JSON object with keys
that name an image and an annotation. Accepted spellings, tried in order:

- image: ``image``, ``image_path``, ``imagePath``, ``image_file``, ``raw``,
  ``input``, ``input_path``, ``source``, ``img`` (and their camelCase forms);
- annotation: ``annotation``, ``annotation_path``, ``mask``, ``mask_path``,
  ``label``, ``label_path``, ``labels``, ``target``, ``gt``,
  ``ground_truth`` (and their camelCase forms).

A value is a path string or an object with ``path``/``file``/``uri``/``name``.
``/a/b.tif`` is relative to the dataset root, ``a/b.tif`` too, and a bare
``b.tif`` (or ``./b.tif``) is relative to the JSON file's folder. URLs are
skipped, as the original skipped them. A record whose ``split`` (or
``dataset_split``, ``subset``, ``partition``) is ``test``, ``val`` or
``validation`` goes to the test set, every other one to training.

Every path is checked like any other path a caller gives (no ``..``, no
absolute paths outside the dataset), and the files must exist in the dataset.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

from natsort import natsorted

from cellpose_finetuning.data.pairing import Pair, safe_relpath
from cellpose_finetuning.errors import InvalidInput

__all__ = ["load_metadata_document", "pairs_from_metadata"]

_CONTAINERS = ("records", "items", "samples", "entries", "data")
_PAIR_HINTS = ("image", "mask", "annotation", "label", "input", "target")
_SPLIT_KEYS = ("split", "dataset_split", "subset", "partition")
_TEST_SPLITS = frozenset({"test", "val", "validation"})


def _spellings(*names: str) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        head, *rest = name.split("_")
        out += [name, head + "".join(w.capitalize() for w in rest)]
    return tuple(dict.fromkeys(out))


IMAGE_KEYS = _spellings(
    "image",
    "image_path",
    "imagepath",
    "image_relpath",
    "image_file",
    "raw",
    "raw_image",
    "input",
    "input_path",
    "input_image",
    "source",
    "source_path",
    "img",
)
ANNOTATION_KEYS = _spellings(
    "annotation",
    "annotation_path",
    "annotation_relpath",
    "annotation_file",
    "mask",
    "mask_path",
    "mask_relpath",
    "mask_file",
    "label",
    "label_path",
    "label_file",
    "labels",
    "target",
    "target_path",
    "gt",
    "ground_truth",
)


def load_metadata_document(text: str | bytes, name: str) -> Any:
    """Parse one metadata file; a malformed one is an error naming it."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"metadata_dir: {name}", f"is not valid JSON ({exc})") from None


def _records(payload: Any) -> list[dict[str, Any]]:
    """Every JSON object in ``payload`` that looks like an image/annotation record."""
    found: list[dict[str, Any]] = []
    stack: list[Any] = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            keys = [str(k).lower() for k in item]
            if any(hint in key for hint in _PAIR_HINTS for key in keys) or any(
                k in IMAGE_KEYS or k in ANNOTATION_KEYS for k in item
            ):
                found.append(item)
            stack.extend(reversed([v for v in item.values() if isinstance(v, dict | list)]))
    return found


def _path_of(value: Any, base: str) -> str | None:
    if isinstance(value, dict):
        for key in ("path", "file", "uri", "name"):
            if key in value:
                return _path_of(value[key], base)
        return None
    if not isinstance(value, str) or not value.strip():
        return None
    raw = value.strip()
    if raw.startswith(("http://", "https://")):
        return None
    if raw.startswith("/"):
        return raw.lstrip("/")
    if "/" in raw and not raw.startswith("./"):
        return raw
    return posixpath.join(base, raw) if base else raw


def _first(record: Mapping[str, Any], keys: Iterable[str], base: str) -> str | None:
    for key in keys:
        if key in record:
            path = _path_of(record[key], base)
            if path is not None:
                return path
    return None


def pairs_from_metadata(
    documents: Mapping[str, Any], available: Iterable[str] | None = None
) -> tuple[list[Pair], list[Pair]]:
    """Training and test pairs described by parsed metadata documents.

    Parameters
    ----------
    documents : mapping
        Dataset path of each JSON file -> its parsed content.
    available : iterable of str, optional
        The dataset's file names, to check that every listed file exists.

    Returns
    -------
    (train, test) : tuple of lists of Pair
        Naturally sorted by image name, without duplicates.

    Raises
    ------
    InvalidInput
        Naming ``metadata_dir`` and the file, for paths that leave the
        dataset or files that are not in it.
    """
    names = None if available is None else set(available)
    train: dict[str, Pair] = {}
    test: dict[str, Pair] = {}
    missing: list[str] = []
    for doc_name, payload in natsorted(documents.items()):
        base = posixpath.dirname(doc_name)
        for record in _records(payload):
            image = _first(record, IMAGE_KEYS, base)
            annotation = _first(record, ANNOTATION_KEYS, base)
            if image is None or annotation is None or image == annotation:
                continue
            arg = f"metadata_dir: {doc_name}"
            image, annotation = safe_relpath(image, arg), safe_relpath(annotation, arg)
            if names is not None:
                missing += [f"{doc_name}: {p}" for p in (image, annotation) if p not in names]
            split = next((record[k] for k in _SPLIT_KEYS if record.get(k)), "train")
            target = test if str(split).lower() in _TEST_SPLITS else train
            target.setdefault(image, Pair(image, annotation, image))
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise InvalidInput(
            "metadata_dir", f"{len(missing)} listed files are not in the dataset: {shown}"
        )
    return [train[k] for k in natsorted(train)], [test[k] for k in natsorted(test)]
