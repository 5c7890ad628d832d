"""Local folders as a data source: list the files under a root and pair them safely.

Two kinds of caller. A server (and the tests) holds a data root and takes
specs relative to it, which must never lead outside it: :func:`list_files`
and :func:`pair_local` refuse ``..``, absolute paths and symbolic links that
leave the root. A command-line user types ordinary paths instead
(``/data/exp1/images/`` or ``data/masks/*_mask.tif``): :func:`split_local_spec`
cuts such a spec at its last ``/`` into a root folder and a spec under it
(``"./"`` for a folder, the ``*`` pattern for a pattern), and
:func:`pair_local_specs` pairs two of them under the deepest folder they share.
Pairing itself is :func:`cellpose_finetuning.data.pairing.pair_files`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cellpose_finetuning.data.pairing import is_pattern, pair_files, safe_relpath, spec_dir
from cellpose_finetuning.errors import InvalidInput

__all__ = [
    "cellpose_dir_specs",
    "list_files",
    "pair_local",
    "pair_local_specs",
    "split_local_spec",
]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def list_files(
    root: str | os.PathLike[str],
    spec: str,
    arg: str,
    *,
    allow_links_outside: bool = False,
) -> list[str]:
    """Names of the files directly in the folder a spec lists, relative to ``root``.

    Not recursive; sub-folders and broken links are skipped.

    Parameters
    ----------
    root : path-like
        The data root; nothing outside it is listed.
    spec : str
        A folder (``"images/train/"``) or pattern (``"images/train/*.tif"``)
        relative to ``root``; only its folder matters here.
    arg : str
        The argument the spec came from, named in errors.
    allow_links_outside : bool
        Accept files that are symbolic links to places outside ``root``
        (a command-line user's own data, e.g. git-annex or DataLad datasets).

    Returns
    -------
    list of str
        POSIX names such as ``"images/train/nuclei_00.tif"``, in no set order.

    Raises
    ------
    InvalidInput
        Naming ``arg``: an unsafe spec, a folder outside ``root`` (also through
        a link), a missing folder, a file linking outside ``root``.
    """
    root = Path(root).resolve()
    spec = safe_relpath(spec, arg)
    rel = spec_dir(spec)
    folder = (root / rel).resolve()
    if not _inside(folder, root):
        raise InvalidInput(arg, f"{spec!r} leads outside the data folder {str(root)!r}")
    if not folder.is_dir():
        raise InvalidInput(arg, f"folder {rel or '.'!r} does not exist in {str(root)!r}")
    prefix = rel + "/" if rel else ""
    names = []
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise InvalidInput(arg, f"cannot list {str(folder)!r} ({exc.strerror})") from exc
    for entry in entries:
        if not entry.is_file():  # follows links: folders and broken links drop out
            continue
        name = prefix + entry.name
        if (
            not allow_links_outside
            and entry.is_symlink()
            and not _inside(Path(entry.path).resolve(), root)
        ):
            raise InvalidInput(
                arg, f"{name!r} is a link to a file outside the data folder {str(root)!r}"
            )
        names.append(name)
    return names


def pair_local(
    root: str | os.PathLike[str],
    images_spec: str,
    annotations_spec: str,
    *,
    images_arg: str = "train_images",
    annotations_arg: str = "train_annotations",
    allow_links_outside: bool = False,
) -> list[tuple[Path, Path]]:
    """Pair image and mask files under a local root.

    Parameters
    ----------
    root : path-like
        The data root.
    images_spec, annotations_spec : str
        Two folders or two patterns relative to ``root`` (see
        :func:`~cellpose_finetuning.data.pairing.pair_files`).
    images_arg, annotations_arg : str
        The argument names used in error messages.
    allow_links_outside : bool
        See :func:`list_files`.

    Returns
    -------
    list of (pathlib.Path, pathlib.Path)
        Absolute (image, mask) paths in natural order.

    Raises
    ------
    InvalidInput
        From :func:`list_files` and :func:`~cellpose_finetuning.data.pairing.pair_files`.
    """
    root = Path(root).resolve()
    names = list_files(root, images_spec, images_arg, allow_links_outside=allow_links_outside)
    if spec_dir(annotations_spec) != spec_dir(images_spec):
        names += list_files(
            root, annotations_spec, annotations_arg, allow_links_outside=allow_links_outside
        )
    pairs = pair_files(
        images_spec,
        annotations_spec,
        names,
        images_arg=images_arg,
        annotations_arg=annotations_arg,
    )
    return [(root / p.image, root / p.annotation) for p in pairs]


def split_local_spec(spec: str, arg: str = "spec") -> tuple[Path, str]:
    """Cut a local folder or pattern path into (root folder, spec under it).

    Parameters
    ----------
    spec : str
        A folder ending in ``/`` or a pattern with one ``*`` in its file
        name, absolute or relative to the working directory.
    arg : str
        The argument (command-line option) it came from, named in errors.

    Returns
    -------
    (pathlib.Path, str)
        The folder as given (not resolved) and ``"./"`` for the folder form or
        the file-name pattern for the pattern form.

    Raises
    ------
    InvalidInput
        Neither form (with a hint when it is a folder missing its ``/``), or a
        ``*`` outside the file name.

    Examples
    --------
    >>> split_local_spec("/data/exp1/images/")
    (PosixPath('/data/exp1/images'), './')
    >>> split_local_spec("masks/*_mask.tif")
    (PosixPath('masks'), '*_mask.tif')
    """
    if not isinstance(spec, str) or not spec or "\x00" in spec:
        raise InvalidInput(arg, "must be a non-empty path")
    cut = max(spec.rfind("/"), spec.rfind(os.sep))
    head, tail = (spec[:cut], spec[cut + 1 :]) if cut >= 0 else ("", spec)
    folder = Path(head or "/") if cut >= 0 else Path(".")
    if is_pattern(spec):
        if is_pattern(head) or tail.count("*") != 1:
            raise InvalidInput(
                arg, f"{spec!r}: a pattern needs exactly one '*', in the file-name part"
            )
        return folder, tail
    if not tail:
        return folder, "./"
    if Path(spec).is_dir():
        raise InvalidInput(arg, f"{spec!r} is a folder: end a folder with '/' ({spec + '/'!r})")
    raise InvalidInput(
        arg,
        f"{spec!r} is neither a folder ending in '/' nor a pattern with one '*' "
        "(e.g. 'data/images/' or 'data/masks/*_mask.tif')",
    )


def pair_local_specs(
    images: str,
    annotations: str,
    *,
    images_arg: str = "--train-images",
    annotations_arg: str = "--train-annotations",
) -> list[tuple[Path, Path]]:
    """Pair command-line specs given as ordinary local paths.

    Each spec is split with :func:`split_local_spec`; the two folders'
    deepest common folder becomes the root they are paired under. Files that
    are links to elsewhere are accepted: the user reads their own data.

    Parameters
    ----------
    images, annotations : str
        Two folders ending in ``/`` or two patterns such as
        ``data/imgs/*.tif``, absolute or relative to the working directory.
    images_arg, annotations_arg : str
        The option names used in error messages.

    Returns
    -------
    list of (pathlib.Path, pathlib.Path)
        Absolute (image, mask) paths in natural order.

    Raises
    ------
    InvalidInput
        Naming the option: malformed spec, missing folder, or any pairing error.
    """
    folders = []
    specs = []
    for value, arg in ((images, images_arg), (annotations, annotations_arg)):
        folder, spec = split_local_spec(value, arg)
        if not folder.is_dir():
            raise InvalidInput(arg, f"folder {str(folder)!r} does not exist")
        folders.append(folder.resolve())
        specs.append(spec)
    root = Path(os.path.commonpath(folders))

    def under(folder: Path, spec: str) -> str:
        sub = folder.relative_to(root).as_posix()
        return spec if sub == "." else f"{sub}/{spec}"

    return pair_local(
        root,
        under(folders[0], specs[0]),
        under(folders[1], specs[1]),
        images_arg=images_arg,
        annotations_arg=annotations_arg,
        allow_links_outside=True,
    )


#: Files cellpose's own commands leave in an image folder that are never images.
_CELLPOSE_OUTPUTS = ("_flows", "_cp_masks", "_cp_output", "_outlines", "_seg", "_rois")


def cellpose_dir_specs(
    folder: str | os.PathLike[str], mask_filter: str = "_masks", arg: str = "--dir"
) -> tuple[str, str]:
    """cellpose's ``--dir D --mask_filter F`` as our two pattern specs.

    cellpose keeps images and annotations in one folder: ``a.tif`` with
    ``a_masks.tif`` (``--mask_filter _masks``, its default) or with the GUI's
    ``a_seg.npy`` (``--mask_filter _seg.npy``). The annotation suffix is the
    filter itself when it ends in a file type (``_seg.npy``, ``.geojson``),
    else the filter plus the one file type its files use; the image suffix is
    the one file type of the images those annotations belong to. The specs
    then pair as usual (:func:`pair_local_specs`), with the usual errors.

    Parameters
    ----------
    folder : path-like
        The folder with images and annotations.
    mask_filter : str
        What annotation names add to their image's stem.
    arg : str
        The option named in errors.

    Returns
    -------
    (str, str)
        Image and annotation patterns, e.g. ``("D/*.tif", "D/*_seg.npy")``.

    Raises
    ------
    InvalidInput
        No such folder, no annotation files, or several file types where one is needed.

    Examples
    --------
    With ``D/a.tif``, ``D/a_seg.npy``: ``cellpose_dir_specs("D", "_seg.npy")``
    gives ``("D/*.tif", "D/*_seg.npy")``.
    """
    from cellpose_finetuning.io.annotations import ANNOTATION_SUFFIXES
    from cellpose_finetuning.io.images import is_image_file

    root = Path(folder)
    if not root.is_dir():
        raise InvalidInput(arg, f"folder {str(root)!r} does not exist")
    if not mask_filter or "/" in mask_filter or "*" in mask_filter:
        raise InvalidInput("--mask_filter", f"{mask_filter!r} is not a file-name ending")
    names = sorted(e.name for e in os.scandir(root) if e.is_file())
    lower_filter = mask_filter.lower()
    if lower_filter.endswith(ANNOTATION_SUFFIXES):
        mask_suffix = mask_filter
    else:
        exts = {
            os.path.splitext(n)[1]
            for n in names
            if os.path.splitext(n)[0].endswith(mask_filter)
            and n.lower().endswith(ANNOTATION_SUFFIXES)
        }
        if not exts:
            raise InvalidInput(
                arg,
                f"no annotation files ending in {mask_filter!r} (+ a file type) in {str(root)!r}; "
                "set --mask_filter (e.g. _seg.npy for the cellpose GUI's files)",
            )
        if len(exts) > 1:
            raise InvalidInput(
                arg,
                f"annotations ending in {mask_filter!r} have several file types "
                f"({', '.join(sorted(exts))}); keep one, or give --train-annotations",
            )
        mask_suffix = mask_filter + exts.pop()
    keys = {n[: -len(mask_suffix)] for n in names if n.endswith(mask_suffix)}
    img_exts = {
        os.path.splitext(n)[1]
        for n in names
        if is_image_file(n)
        and not n.endswith(mask_suffix)
        and not os.path.splitext(n)[0].endswith(_CELLPOSE_OUTPUTS)
        and os.path.splitext(n)[0] in keys
    }
    if not img_exts:
        raise InvalidInput(
            arg, f"no image in {str(root)!r} has an annotation named '<image stem>{mask_suffix}'"
        )
    if len(img_exts) > 1:
        raise InvalidInput(
            arg,
            f"the images have several file types ({', '.join(sorted(img_exts))}); keep one, "
            "or give --train-images and --train-annotations patterns",
        )
    base = root.as_posix().rstrip("/") + "/"
    return base + "*" + img_exts.pop(), base + "*" + mask_suffix
