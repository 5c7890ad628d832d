"""Reading images and instance masks into canonical arrays, with errors that name the file.

Canonical axes: 2D images are ``(C, H, W)`` with ``C >= 1``; 3D stacks are
``(Z, C, H, W)``. Masks are ``(H, W)`` (or ``(Z, H, W)``) integer instance
labels, 0 = background, renumbered 1..N, uint16 (uint32 above 65535 objects).

Which axis is which, when a file carries no axis metadata (``.npy``, plain
TIFF) or for an in-memory array (:func:`infer_axes`):

=====  ===================================================  =======
ndim   rule                                                 axes
=====  ===================================================  =======
2      always                                               YX
3      last axis <= 4 entries and first axis > 4            YXC
3      else first axis <= 4 entries                         CYX
3      otherwise                                            ZYX
4      second axis <= 4 entries                             ZCYX
4      else last axis <= 4 entries                          ZYXC
4      otherwise                                            error
=====  ===================================================  =======

So a 3-slice grey stack ``(3, H, W)`` reads as 3 channels: give its axes
explicitly (``to_canonical(arr, "ZYX")``, or OME/ImageJ metadata) when that
is wrong. OME-TIFF and ImageJ TIFF axes are honoured instead of the rule
(``C`` and ``S`` are channels, ``Z`` is depth; any other axis, such as ``T``,
must have length 1). PNG and JPEG are greyscale ``(1, H, W)`` or RGB
``(3, H, W)`` (alpha is dropped).

Masks are read without any colour conversion: palette PNGs keep their
indices; RGB(A) masks are accepted when their three colour channels are equal
(grey) or in the BioImage.IO Colab format (blue = 0 everywhere,
id = R * 256 + G).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.image_files import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_IMAGE_SUFFIXES,
    is_image_file,
    read_raw,
    tiff_target,
)

__all__ = [
    "CHANNEL_AXIS_RULE",
    "DEFAULT_MAX_PIXELS",
    "MASK_SUFFIXES",
    "SUPPORTED_IMAGE_SUFFIXES",
    "infer_axes",
    "is_image_file",
    "read_image",
    "to_canonical",
    "write_image",
]

MASK_SUFFIXES = SUPPORTED_IMAGE_SUFFIXES
#: The rule of :func:`infer_axes` in one sentence, for error messages and API docs.
CHANNEL_AXIS_RULE = (
    "arrays without axis names are read as: 2-D -> (H, W); 3-D -> (H, W, C) if the last "
    "axis has <= 4 entries and the first > 4, else (C, H, W) if the first has <= 4, else "
    "a grey stack (Z, H, W); 4-D -> (Z, C, H, W) if the second axis has <= 4 entries, else "
    "(Z, H, W, C) if the last has <= 4"
)


def infer_axes(shape: tuple[int, ...]) -> str:
    """Guess the axes of an array without metadata (the rule in the module docstring).

    Parameters
    ----------
    shape : tuple of int
        The array's shape.

    Returns
    -------
    str
        One of ``"YX"``, ``"YXC"``, ``"CYX"``, ``"ZYX"``, ``"ZCYX"``, ``"ZYXC"``.

    Raises
    ------
    ValueError
        For fewer than 2 or more than 4 dimensions, or a 4-D shape with no
        axis of at most 4 entries in the second or last place.

    Examples
    --------
    >>> infer_axes((256, 256, 3)), infer_axes((2, 256, 256)), infer_axes((31, 61, 57))
    ('YXC', 'CYX', 'ZYX')
    """
    shape = tuple(shape)
    nd = len(shape)
    if nd == 2:
        return "YX"
    if nd == 3:
        if shape[-1] <= 4 < shape[0]:
            return "YXC"
        if shape[0] <= 4:
            return "CYX"
        return "ZYX"
    if nd == 4:
        if shape[1] <= 4:
            return "ZCYX"
        if shape[-1] <= 4:
            return "ZYXC"
        raise ValueError(
            f"cannot tell the channel axis of a 4-D array of shape {shape}: "
            "channels must be the second or last axis, with at most 4 entries"
        )
    raise ValueError(f"expected 2 to 4 dimensions, got {nd} (shape {shape})")


def drop_singletons(arr: np.ndarray, axes: str, keep: str, name: str) -> tuple[np.ndarray, str]:
    """Remove length-1 axes not in ``keep``; refuse longer ones."""
    for i in reversed(range(len(axes))):
        if axes[i] in keep:
            continue
        if arr.shape[i] != 1:
            raise InvalidInput(
                name,
                f"axis {axes[i]!r} has {arr.shape[i]} entries (axes {axes!r}, shape "
                f"{arr.shape}); only one is supported",
            )
        arr = arr.take(0, axis=i)
        axes = axes[:i] + axes[i + 1 :]
    return arr, axes


def merge_channel_axes(arr: np.ndarray, axes: str, name: str) -> tuple[np.ndarray, str]:
    """Map S (samples) to C; when a file has both, one of them must have length 1."""
    if "S" in axes and "C" in axes:
        for letter in "SC":
            i = axes.index(letter)
            if arr.shape[i] == 1:
                return merge_channel_axes(arr.take(0, axis=i), axes[:i] + axes[i + 1 :], name)
        raise InvalidInput(
            name,
            f"has both channels (C={arr.shape[axes.index('C')]}) and samples per pixel "
            f"(S={arr.shape[axes.index('S')]}); save one channel axis only",
        )
    return arr, axes.replace("S", "C")


def to_canonical(
    array: np.ndarray, axes: str | None = None, name: str = "input_arrays[0]"
) -> np.ndarray:
    """Reorder an image array to (C, H, W) or (Z, C, H, W).

    Parameters
    ----------
    array : numpy.ndarray
        Image data, integer or floating point.
    axes : str, optional
        Its axes, one letter each: ``Y``, ``X``, ``C`` (or ``S``), ``Z``, and
        others (``T``...) of length 1. Guessed with :func:`infer_axes` when missing.
    name : str
        How to name the input in errors (argument name or file path).

    Returns
    -------
    numpy.ndarray
        A C-contiguous array in canonical axes, dtype unchanged.

    Raises
    ------
    InvalidInput
        Naming ``name``: empty array, bool/complex/object values, wrong number
        of dimensions, axes that do not fit the shape.

    Examples
    --------
    >>> to_canonical(np.zeros((64, 80, 3))).shape
    (3, 64, 80)
    >>> to_canonical(np.zeros((3, 64, 80)), "ZYX").shape
    (3, 1, 64, 80)
    """
    arr = np.asarray(array)
    if arr.size == 0:
        raise InvalidInput(name, f"image is empty (shape {arr.shape})")
    if arr.dtype.kind not in "uif":
        raise InvalidInput(name, f"unsupported pixel type {arr.dtype}; use integers or floats")
    if axes is None:
        try:
            axes = infer_axes(arr.shape)
        except ValueError as exc:
            raise InvalidInput(name, str(exc)) from None
    axes = axes.upper()
    if len(axes) != arr.ndim:
        raise InvalidInput(name, f"axes {axes!r} do not match shape {arr.shape}")
    if len(set(axes)) != len(axes):
        raise InvalidInput(name, f"axes {axes!r} name an axis twice")
    arr, axes = merge_channel_axes(arr, axes, name)
    arr, axes = drop_singletons(arr, axes, "ZCYX", name)
    if "Y" not in axes or "X" not in axes:
        raise InvalidInput(name, f"needs Y and X axes, got {axes!r} for shape {arr.shape}")
    if "C" not in axes:
        arr, axes = arr[..., None], axes + "C"
    target = "ZCYX" if "Z" in axes else "CYX"
    out = np.moveaxis(arr, [axes.index(a) for a in target], range(len(target)))
    return np.ascontiguousarray(out)


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as (C, H, W) or (Z, C, H, W).

    Parameters
    ----------
    path : path-like
        A ``.tif/.tiff/.ome.tif/.ome.tiff``, ``.png/.jpg/.jpeg`` or ``.npy`` file.
    max_pixels : int, optional
        Refuse files declaring more values than this (all axes together),
        checked from the header before the data is read. Default 2**31.

    Returns
    -------
    numpy.ndarray
        The pixels in canonical axes, in the file's dtype.

    Raises
    ------
    InvalidInput
        Naming the file: missing, empty, corrupt, unsupported type, too large,
        axes we cannot map (e.g. several time points).
    """
    path = Path(path)
    arr, axes = read_raw(path, max_pixels, mask=False)
    return to_canonical(arr, axes, name=str(path))


def write_image(path: str | os.PathLike[str], image: np.ndarray, axes: str | None = None) -> Path:
    """Write an image as a zlib-compressed TIFF that :func:`read_image` reads back as is.

    The axes (``CYX`` or ``ZCYX``) are stored in the file, as OME metadata
    for ``.ome.tif`` names, so a 3-slice stack is not mistaken for 3 channels.

    Parameters
    ----------
    path : path-like
        Target ``.tif``/``.tiff``/``.ome.tif`` file; its folder is created.
    image : numpy.ndarray
        Pixels, canonical or with ``axes`` given (see :func:`to_canonical`).
    axes : str, optional
        Axes of ``image`` when it is not canonical.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    import tifffile

    path = tiff_target(Path(path))
    arr = to_canonical(image, axes if axes is not None else _canonical_axes(image), str(path))
    out_axes = "ZCYX" if arr.ndim == 4 else "CYX"
    tifffile.imwrite(
        path,
        arr,
        compression="zlib",
        photometric="minisblack",
        metadata={"axes": out_axes},
        ome=path.name.lower().endswith((".ome.tif", ".ome.tiff")),
    )
    return path


def _canonical_axes(image: np.ndarray) -> str | None:
    """Axes of an array already in canonical form; None (guess) for other shapes."""
    ndim = np.ndim(image)
    return {3: "CYX", 4: "ZCYX"}.get(ndim)


# Masks moved to cellpose_finetuning.io.masks (which imports this module, so it
# cannot be imported here at the top); their old import path still works.
_MASK_NAMES = frozenset({"read_mask", "validate_mask", "write_mask"})


def __getattr__(name: str) -> Any:
    if name in _MASK_NAMES:
        from cellpose_finetuning.io import masks

        return getattr(masks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
