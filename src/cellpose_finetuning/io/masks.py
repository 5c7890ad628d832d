"""Instance masks: checking and renumbering labels, reading mask files, writing them.

Masks are ``(H, W)`` (or ``(Z, H, W)``) integer instance labels, 0 =
background, renumbered 1..N, uint16 (uint32 above 65535 objects). They are
read without any colour conversion: palette PNGs keep their indices; RGB(A)
masks are accepted when their three colour channels are equal (grey) or in
the BioImage.IO Colab format (blue = 0 everywhere, id = R * 256 + G). The
tools' annotation formats come through :mod:`cellpose_finetuning.io.annotations`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.image_files import (
    DEFAULT_MAX_PIXELS,
    check_file,
    check_size,
    read_raw,
    tiff_target,
)
from cellpose_finetuning.io.images import drop_singletons, merge_channel_axes

__all__ = ["check_labels", "read_mask", "validate_mask", "write_mask"]

_COLOUR_MASK_HELP = (
    "use a single-channel label image, a palette PNG, or the BioImage.IO Colab RGB "
    "format (id = R*256 + G, blue = 0 everywhere)"
)


def check_labels(arr: np.ndarray, name: str) -> None:
    """Refuse arrays that are not non-negative whole-number labels of 2 or 3 dimensions."""
    if arr.size == 0:
        raise InvalidInput(name, f"mask is empty (shape {arr.shape})")
    if arr.ndim not in (2, 3):
        raise InvalidInput(
            name, f"mask must be (H, W) or (Z, H, W), got {arr.ndim} dimensions {arr.shape}"
        )
    if arr.dtype == bool:
        raise InvalidInput(
            name,
            "mask is boolean (foreground/background only); instance labels are needed, "
            "one integer id per object",
        )
    if arr.dtype.kind not in "uif":
        raise InvalidInput(name, f"unsupported mask type {arr.dtype}; use integer labels")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise InvalidInput(name, "mask has NaN or infinite values")
        frac = arr[arr != np.round(arr)]
        if frac.size:
            raise InvalidInput(
                name,
                f"mask has non-integer values (e.g. {float(frac.flat[0])}); masks must be "
                "integer instance labels",
            )
    if arr.dtype.kind != "u" and arr.min() < 0:
        raise InvalidInput(name, f"mask has negative labels (min {arr.min()})")
    if arr.max() > np.iinfo("uint32").max:
        raise InvalidInput(name, f"mask label {arr.max()} does not fit in uint32")


def validate_mask(
    mask: np.ndarray, name: str, expected_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Check an instance label array and renumber it 1..N.

    Float masks are accepted when every value is a whole number; labels are
    renumbered to 1..N, keeping 0 as background.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) or (Z, H, W) labels.
    name : str
        File path or argument name for error messages.
    expected_shape : tuple of int, optional
        The shape the mask must have (the image's (H, W) or (Z, H, W)).

    Returns
    -------
    numpy.ndarray
        uint16 labels, or uint32 when there are more than 65535 objects.

    Raises
    ------
    InvalidInput
        Naming ``name``: wrong shape, non-integer or negative values, boolean
        (semantic) masks, wrong number of dimensions.
    """
    import fastremap

    arr = np.asarray(mask)
    check_labels(arr, name)
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise InvalidInput(
            name,
            f"mask shape {tuple(arr.shape)} differs from image shape {tuple(expected_shape)}",
        )
    labels = np.ascontiguousarray(arr.astype("int64", copy=False))
    renumbered, _ = fastremap.renumber(labels, preserve_zero=True)
    top = int(renumbered.max())
    return renumbered.astype("uint16" if top <= 65535 else "uint32")


def _decode_colour(rgb: np.ndarray, name: str) -> np.ndarray:
    """Turn an (..., 3 or 4) label picture into one label image."""
    rgb = rgb[..., :3]
    if rgb.dtype.kind not in "ui":
        raise InvalidInput(name, f"colour mask has {rgb.dtype} values; {_COLOUR_MASK_HELP}")
    r, g, b = (rgb[..., i].astype("int64") for i in range(3))
    if np.array_equal(r, g) and np.array_equal(g, b):
        return r
    if not b.any():  # BioImage.IO Colab: id = R*256 + G
        return r * 256 + g
    raise InvalidInput(name, f"colour mask is not a label image; {_COLOUR_MASK_HELP}")


def _mask_labels(arr: np.ndarray, axes: str | None, name: str) -> np.ndarray:
    """Reduce a mask file's array to (H, W) or (Z, H, W) labels."""
    if axes is not None:
        axes = axes.upper()
        arr, axes = merge_channel_axes(arr, axes, name)
        # Only a real colour axis or a real stack survives; length-1 C and Z go.
        keep = "".join(a for a in "ZC" if a in axes and arr.shape[axes.index(a)] > 1)
        arr, axes = drop_singletons(arr, axes, keep + "YX", name)
        if "C" in axes:
            n = arr.shape[axes.index("C")]
            if n not in (3, 4):
                raise InvalidInput(name, f"mask has {n} channels; one label image is needed")
            arr = np.moveaxis(arr, axes.index("C"), -1)
            axes = axes.replace("C", "") + "C"
            arr, axes = _decode_colour(arr, name), axes[:-1]
        order = [axes.index(a) for a in "ZYX" if a in axes]
        return np.moveaxis(arr, order, range(len(order)))
    # No metadata: colour last (RGB pictures), singleton channel axes squeezed.
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        return _decode_colour(arr, name)
    while arr.ndim > 2 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    return arr


def read_mask(
    path: str | os.PathLike[str],
    expected_shape: tuple[int, ...] | None = None,
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Read an instance mask file as renumbered labels.

    Palette PNGs keep their indices; RGB(A) masks in the BioImage.IO Colab
    format (blue = 0, id = R*256 + G) or with three equal channels are
    decoded; a singleton channel axis is dropped. Other colour pictures are
    refused. The tools' own formats are read too
    (:mod:`cellpose_finetuning.io.annotations`): cellpose GUI ``_seg.npy``
    (safely), QuPath ``.geojson`` and ImageJ ROI sets (``.zip``), the last two
    rasterised at ``expected_shape``.

    Parameters
    ----------
    path : path-like
        Mask file (the suffixes of :func:`read_image`, ``.geojson`` and ``.zip``).
    expected_shape : tuple of int, optional
        The shape the mask must have: the image's (H, W), or (Z, H, W).
        Needed for ``.geojson`` and ``.zip``.
    max_pixels : int, optional
        Limit on the values the file declares (default 2**31).

    Returns
    -------
    numpy.ndarray
        (H, W) or (Z, H, W) labels 0..N, uint16 (uint32 above 65535 objects).

    Raises
    ------
    InvalidInput
        Naming the file, for any problem :func:`read_image` or
        :func:`validate_mask` reports, and for colour masks in no known format.
    """
    from cellpose_finetuning.io.annotations import read_annotation_labels

    path = Path(path)
    check_file(path, mask=True)
    if expected_shape is not None:
        check_size(path, tuple(expected_shape), max_pixels or DEFAULT_MAX_PIXELS)
    labels = read_annotation_labels(path, expected_shape)
    if labels is not None:
        return validate_mask(labels, str(path), expected_shape)
    arr, axes = read_raw(path, max_pixels, mask=True)
    return validate_mask(_mask_labels(arr, axes, str(path)), str(path), expected_shape)


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> Path:
    """Write labels as a zlib-compressed TIFF, uint16 (uint32 above 65535).

    Labels are written as they are (not renumbered).

    Parameters
    ----------
    path : path-like
        Target ``.tif``/``.tiff`` file; its folder is created.
    mask : numpy.ndarray
        (H, W) or (Z, H, W) non-negative integer labels.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    import tifffile

    path = tiff_target(Path(path))
    arr = np.asarray(mask)
    check_labels(arr, str(path))
    top = int(arr.max())
    tifffile.imwrite(path, arr.astype("uint16" if top <= 65535 else "uint32"), compression="zlib")
    return path
