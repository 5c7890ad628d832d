"""Reading images and instance masks into canonical arrays, with errors that name the file.

Canonical axes: 2D images are ``(C, H, W)`` with ``C >= 1``; 3D stacks are
``(Z, C, H, W)``. Masks are ``(H, W)`` (or ``(Z, H, W)``) integer instance
labels, 0 = background, renumbered 1..N.

Which axis is which, when a file carries no axis metadata (``.npy``, plain
TIFF) or for an in-memory array (:func:`infer_axes`):

=====  ===================================================  =======
ndim   rule                                                 axes
=====  ===================================================  =======
2      always                                               YX
3      last axis <= 4 entries and first axis > 4            YXC
3      first axis <= 4 entries                              CYX
3      otherwise                                            ZYX
4      second axis <= 4 entries                             ZCYX
4      else last axis <= 4 entries                          ZYXC
=====  ===================================================  =======

OME-TIFF and ImageJ TIFF axes are honoured instead (``C``/``S`` are
channels, ``Z`` is depth; other axes must have length 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = [
    "MASK_SUFFIXES",
    "SUPPORTED_IMAGE_SUFFIXES",
    "infer_axes",
    "is_image_file",
    "read_image",
    "read_mask",
    "to_canonical",
    "validate_mask",
    "write_mask",
]

SUPPORTED_IMAGE_SUFFIXES = (
    ".ome.tif",
    ".ome.tiff",
    ".tif",
    ".tiff",
    ".png",
    ".jpg",
    ".jpeg",
    ".npy",
)
MASK_SUFFIXES = SUPPORTED_IMAGE_SUFFIXES
#: Default limit on pixels (all axes) of one image: 2**31 values.
DEFAULT_MAX_PIXELS = 2**31


def is_image_file(name: str | os.PathLike[str]) -> bool:
    """Whether a file name has a supported image suffix (case-insensitive)."""
    return str(name).lower().endswith(SUPPORTED_IMAGE_SUFFIXES)


def infer_axes(shape: tuple[int, ...]) -> str:
    """Guess the axes of an array without metadata (rule in the module docstring).

    Raises
    ------
    ValueError
        For fewer than 2 or more than 4 dimensions.
    """
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
        raise ValueError(f"cannot tell the channel axis of a 4-D array of shape {shape}")
    raise ValueError(f"expected 2 to 4 dimensions, got {nd} (shape {shape})")


def to_canonical(array: np.ndarray, axes: str | None = None, *, name: str = "image") -> np.ndarray:
    """Reorder an array to (C,H,W) or (Z,C,H,W).

    Parameters
    ----------
    array : numpy.ndarray
        Image data.
    axes : str, optional
        Its axes using the letters Y, X, C (or S), Z, and others of length 1;
        guessed with :func:`infer_axes` when missing.
    name : str
        How to name the input in errors.
    """
    arr = np.asarray(array)
    if arr.size == 0:
        raise InvalidInput(name, f"image is empty (shape {arr.shape})")
    if arr.dtype == bool or np.iscomplexobj(arr) or arr.dtype.kind not in "uif":
        raise InvalidInput(name, f"unsupported pixel type {arr.dtype}; use integers or floats")
    if axes is None:
        try:
            axes = infer_axes(arr.shape)
        except ValueError as exc:
            raise InvalidInput(name, str(exc)) from None
    axes = axes.upper().replace("S", "C")
    if len(axes) != arr.ndim:
        raise InvalidInput(name, f"axes {axes!r} do not match shape {arr.shape}")
    # Drop singleton axes we don't use (T, Q, I...).
    for i in reversed(range(len(axes))):
        if axes[i] not in "ZCYX":
            if arr.shape[i] != 1:
                raise InvalidInput(
                    name, f"axis {axes[i]!r} has {arr.shape[i]} entries; only one is supported"
                )
            arr = arr.take(0, axis=i)
            axes = axes[:i] + axes[i + 1 :]
    if "Y" not in axes or "X" not in axes or len(set(axes)) != len(axes):
        raise InvalidInput(name, f"need Y and X axes, got {axes!r}")
    if "C" not in axes:
        arr, axes = arr[..., None], axes + "C"
    target = "ZCYX" if "Z" in axes else "CYX"
    out = np.moveaxis(arr, [axes.index(a) for a in target], range(len(target)))
    if min(out.shape[-2:]) < 1:
        raise InvalidInput(name, f"image has no pixels (shape {out.shape})")
    return out


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InvalidInput(str(path), "file does not exist")
    if not path.is_file():
        raise InvalidInput(str(path), "is not a file")
    if path.stat().st_size == 0:
        raise InvalidInput(str(path), "file is empty (0 bytes)")
    if not is_image_file(path.name):
        raise InvalidInput(
            str(path), f"unsupported file type; use one of {', '.join(SUPPORTED_IMAGE_SUFFIXES)}"
        )


def _read_tiff(path: Path, max_pixels: int) -> tuple[np.ndarray, str | None]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            if int(np.prod(shape, dtype="float64")) > max_pixels:
                raise InvalidInput(
                    str(path),
                    f"declares {shape} = {int(np.prod(shape, dtype='float64')):,} values, "
                    f"more than the limit of {max_pixels:,}",
                )
            data = series.asarray()
    except InvalidInput:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise InvalidInput(str(path), f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    # tifffile names unknown axes Q or I; such files follow our rule instead.
    return data, axes if _tiff_axes_known(axes) else None


def _tiff_axes_known(axes: str) -> bool:
    """Whether tifffile found real axis metadata (not just its Q/I placeholders)."""
    axes = axes.upper()
    return not (set(axes) & {"Q", "I"}) and ("Y" in axes and "X" in axes)


def _read_pil(path: Path, *, keep_palette: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height == 0:
                raise InvalidInput(str(path), "image has no pixels")
            if im.mode == "P" and keep_palette:
                return np.asarray(im)  # palette indices, not colours
            if im.mode in ("RGBA", "LA", "PA", "P"):
                im = im.convert("RGB" if im.mode != "LA" else "L")
            return np.asarray(im)
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInput(str(path), f"cannot read image ({exc})") from exc


def _read_raw(path: Path, *, max_pixels: int, keep_palette: bool) -> tuple[np.ndarray, str | None]:
    _check_file(path)
    lower = path.name.lower()
    if lower.endswith((".tif", ".tiff")):
        return _read_tiff(path, max_pixels)
    if lower.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if int(np.prod(arr.shape, dtype="float64")) > max_pixels:
                raise InvalidInput(str(path), f"declares shape {arr.shape}, over the pixel limit")
            return np.asarray(arr), None
        except InvalidInput:
            raise
        except Exception as exc:
            raise InvalidInput(str(path), f"cannot read .npy ({exc})") from exc
    arr = _read_pil(path, keep_palette=keep_palette)
    return arr, ("YXC" if arr.ndim == 3 else "YX")


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as (C,H,W) or (Z,C,H,W).

    Parameters
    ----------
    path : path-like
        A ``.tif/.tiff/.ome.tif``, ``.png/.jpg`` or ``.npy`` file.
    max_pixels : int, optional
        Refuse files declaring more values than this (checked before reading).

    Raises
    ------
    InvalidInput
        Naming the file: missing, empty, corrupt, unsupported, too large, bad axes.
    """
    path = Path(path)
    arr, axes = _read_raw(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, keep_palette=False)
    return to_canonical(arr, axes, name=str(path))


def validate_mask(
    mask: np.ndarray, name: str, expected_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Check and renumber an instance label array.

    Float masks are accepted when every value is a whole number; labels are
    renumbered to 1..N keeping 0 as background.

    Returns
    -------
    numpy.ndarray
        uint16 labels, or uint32 when there are more than 65535 objects.

    Raises
    ------
    InvalidInput
        Naming ``name``: wrong shape, non-integer or negative values, boolean masks.
    """
    import fastremap

    arr = np.asarray(mask)
    if arr.size == 0:
        raise InvalidInput(name, "mask is empty")
    if arr.dtype == bool:
        raise InvalidInput(name, "mask is boolean (foreground only); instance labels are needed")
    if arr.dtype.kind not in "uif":
        raise InvalidInput(name, f"unsupported mask type {arr.dtype}")
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
    if arr.min() < 0:
        raise InvalidInput(name, f"mask has negative labels (min {arr.min()})")
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise InvalidInput(
            name, f"mask shape {tuple(arr.shape)} differs from image shape {tuple(expected_shape)}"
        )
    labels = arr.astype("int64", copy=False)
    renumbered, _ = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True)
    top = int(renumbered.max())
    return renumbered.astype("uint16" if top <= 65535 else "uint32")


def _decode_mask_channels(arr: np.ndarray, name: str) -> np.ndarray:
    """Turn an RGB(A) label picture into one label image."""
    rgb = arr[..., :3].astype("int64")
    if np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]):
        return rgb[..., 0]
    if np.all(rgb[..., 2] == 0):  # BioImage.IO Colab: id = R*256 + G
        return rgb[..., 0] * 256 + rgb[..., 1]
    raise InvalidInput(
        name,
        "colour mask is not a label image: use a single-channel or palette image, or the "
        "BioImage.IO Colab RGB format (id = R*256 + G, blue = 0)",
    )


def read_mask(
    path: str | os.PathLike[str],
    expected_shape: tuple[int, ...] | None = None,
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Read an instance mask file.

    Palette PNGs keep their indices; RGB masks in the BioImage.IO Colab
    format are decoded; a (1,H,W) or (H,W,1) file is squeezed.

    Parameters
    ----------
    path : path-like
        Mask file.
    expected_shape : tuple, optional
        (H, W) the mask must have (the image's).
    max_pixels : int, optional
        Limit on declared values.

    Returns
    -------
    numpy.ndarray
        Renumbered labels (uint16 or uint32).
    """
    path = Path(path)
    arr, _axes = _read_raw(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, keep_palette=True)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        arr = _decode_mask_channels(arr, str(path))
    elif arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape([s for s in arr.shape if s != 1] or [1])
    return validate_mask(arr, str(path), expected_shape)


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> Path:
    """Write labels as a zlib-compressed TIFF (uint16, or uint32 when needed)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.asarray(mask)
    top = int(mask.max()) if mask.size else 0
    tifffile.imwrite(path, mask.astype("uint16" if top <= 65535 else "uint32"), compression="zlib")
    return path
