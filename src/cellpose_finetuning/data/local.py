"""Local folders as a data source: list files under a root and pair them safely."""

from __future__ import annotations

import os
from pathlib import Path

from cellpose_finetuning.data.pairing import Pair, is_pattern, pair_files, spec_dir
from cellpose_finetuning.errors import InvalidInput

__all__ = ["list_files", "pair_local", "pair_local_specs"]


def list_files(root: str | os.PathLike[str], spec: str, arg: str) -> list[str]:
    """Names (relative to ``root``) of the files directly in the folder of ``spec``.

    Refuses folders that resolve outside ``root`` (``..``, symlinks).
    """
    root = Path(root).resolve()
    folder = (root / spec_dir(spec)).resolve()
    if folder != root and root not in folder.parents:
        raise InvalidInput(arg, f"{spec!r} points outside the data folder {str(root)!r}")
    if not folder.is_dir():
        raise InvalidInput(arg, f"folder {str(folder)!r} does not exist")
    out = []
    for entry in os.scandir(folder):
        if entry.is_file():
            resolved = Path(entry.path).resolve()
            if resolved != root and root not in resolved.parents:
                continue  # a symlink leading out of the root is ignored
            out.append(Path(entry.path).relative_to(root).as_posix())
    return out


def pair_local(
    root: str | os.PathLike[str],
    images_spec: str,
    annotations_spec: str,
    *,
    images_arg: str = "train_images",
    annotations_arg: str = "train_annotations",
) -> list[tuple[Path, Path]]:
    """Pair files under ``root`` (specs relative to it); returns absolute paths."""
    root = Path(root).resolve()
    names = list_files(root, images_spec, images_arg)
    if spec_dir(annotations_spec) != spec_dir(images_spec):
        names += list_files(root, annotations_spec, annotations_arg)
    pairs: list[Pair] = pair_files(
        images_spec,
        annotations_spec,
        names,
        images_arg=images_arg,
        annotations_arg=annotations_arg,
    )
    return [(root / p.image, root / p.annotation) for p in pairs]


def pair_local_specs(
    images: str,
    annotations: str,
    *,
    images_arg: str = "--train-images",
    annotations_arg: str = "--train-annotations",
) -> list[tuple[Path, Path]]:
    """Pair command-line specs given as ordinary local paths.

    ``images`` and ``annotations`` are folders ending in ``/`` or patterns
    like ``data/imgs/*.tif``, absolute or relative to the working directory.
    Their deepest common folder becomes the root they are paired under.
    """
    for spec, arg in ((images, images_arg), (annotations, annotations_arg)):
        if not spec.endswith("/") and not is_pattern(spec):
            if Path(spec).is_dir():
                raise InvalidInput(arg, f"{spec!r}: end a folder with '/' (e.g. {spec + '/'!r})")
            raise InvalidInput(
                arg, f"{spec!r} is neither a folder ending in '/' nor a pattern with '*'"
            )
    img_dir = Path(spec_dir(images) or ".").resolve()
    ann_dir = Path(spec_dir(annotations) or ".").resolve()
    for folder, _spec, arg in (
        (img_dir, images, images_arg),
        (ann_dir, annotations, annotations_arg),
    ):
        if not folder.is_dir():
            raise InvalidInput(arg, f"folder {str(folder)!r} does not exist")
    root = Path(os.path.commonpath([img_dir, ann_dir]))

    def rel(folder: Path, spec: str) -> str:
        sub = folder.relative_to(root).as_posix()
        sub = "" if sub == "." else sub + "/"
        return sub + (spec.rpartition("/")[2] if is_pattern(spec) else "")

    return pair_local(
        root,
        rel(img_dir, images) or "./",
        rel(ann_dir, annotations) or "./",
        images_arg=images_arg,
        annotations_arg=annotations_arg,
    )
