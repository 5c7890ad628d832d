"""Reading the pixels of a file (TIFF, PNG/JPEG, ``.npy``) with its axes, safely.

Each reader checks the file (exists, not empty, a suffix we read) and the
size its header declares before any pixel is read, and names the file in its
errors. Putting the array into canonical axes is
:func:`cellpose_finetuning.io.images.to_canonical`'s job.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_IMAGE_SUFFIXES",
    "check_file",
    "check_size",
    "is_image_file",
    "read_raw",
    "tiff_target",
]

#: File suffixes :func:`read_image` and :func:`read_mask` accept (lower case).
SUPPORTED_IMAGE_SUFFIXES: tuple[str, ...] = (
    ".ome.tif",
    ".ome.tiff",
    ".tif",
    ".tiff",
    ".png",
    ".jpg",
    ".jpeg",
    ".npy",
)
#: Default limit on the values (all axes together) of one file: 2**31.
DEFAULT_MAX_PIXELS = 2**31

_TIFF_SUFFIXES = (".tif", ".tiff")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL modes whose np.asarray is already grey or RGB numbers we can use as they are.
_PIL_DIRECT = {"L", "I", "I;16", "I;16B", "I;16L", "F", "RGB"}


def is_image_file(name: str | os.PathLike[str]) -> bool:
    """Whether a file name has a supported image suffix (case-insensitive).

    Examples
    --------
    >>> is_image_file("images/t0000.OME.tif"), is_image_file("labels.geojson")
    (True, False)
    """
    return os.fspath(name).lower().endswith(SUPPORTED_IMAGE_SUFFIXES)


def check_file(path: Path, *, mask: bool = False) -> None:
    """Refuse a missing, empty or non-file path, or one whose suffix we do not read."""
    if not path.exists():
        raise InvalidInput(str(path), "file does not exist")
    if not path.is_file():
        raise InvalidInput(str(path), "is not a file")
    if path.stat().st_size == 0:
        raise InvalidInput(str(path), "file is empty (0 bytes)")
    if mask:
        from cellpose_finetuning.io.annotations import ANNOTATION_SUFFIXES, is_annotation_file

        if not is_annotation_file(path.name):
            raise InvalidInput(
                str(path), f"unsupported file type; use one of {', '.join(ANNOTATION_SUFFIXES)}"
            )
    elif not is_image_file(path.name):
        raise InvalidInput(
            str(path),
            f"unsupported file type; use one of {', '.join(SUPPORTED_IMAGE_SUFFIXES)}",
        )


def check_size(path: Path, shape: tuple[int, ...], max_pixels: int) -> None:
    """Refuse a file whose declared shape holds more than ``max_pixels`` values."""
    # float64 so a forged header cannot overflow the product.
    n = float(np.prod(shape, dtype="float64"))
    if n > max_pixels:
        raise InvalidInput(
            str(path),
            f"declares shape {tuple(shape)} = {n:,.0f} values, more than the limit of "
            f"{max_pixels:,}",
        )


def _tiff_axes_known(axes: str) -> bool:
    """Whether tifffile found real axis metadata (not just its Q/I placeholders)."""
    axes = axes.upper()
    return not (set(axes) & {"Q", "I"}) and "Y" in axes and "X" in axes


def _read_tiff(path: Path, max_pixels: int) -> tuple[np.ndarray, str | None]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InvalidInput(str(path), "cannot read TIFF: it holds no image")
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            # Before asarray: a forged header must not make us allocate.
            check_size(path, shape, max_pixels)
            data = series.asarray()
    except InvalidInput:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise InvalidInput(str(path), f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    # tifffile names unknown axes Q or I; such files follow our rule instead.
    return data, axes if _tiff_axes_known(axes) else None


def _read_npy(path: Path, max_pixels: int) -> np.ndarray:
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        check_size(path, mapped.shape, max_pixels)
        # A copy in memory: the file (e.g. a cache entry) may change after we return.
        return np.array(mapped)
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(str(path), f"cannot read .npy ({type(exc).__name__}: {exc})") from exc


def _read_pil(path: Path, max_pixels: int, *, mask: bool) -> tuple[np.ndarray, str]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            check_size(path, (im.height, im.width, len(im.getbands())), max_pixels)
            if mask and im.mode in ("P", "1"):
                # Palette indices, not colours; "1" gives bool, refused with a reason.
                arr = np.asarray(im)
            elif mask and im.mode == "PA":
                arr = np.asarray(im.getchannel(0))
            elif im.mode in _PIL_DIRECT:
                arr = np.asarray(im)
            elif im.mode in ("LA", "1"):
                arr = np.asarray(im.convert("L"))
            else:  # RGBA, P, PA, CMYK, YCbCr, LAB, HSV...: colours as RGB
                arr = np.asarray(im.convert("RGB"))
    except InvalidInput:
        raise
    except Exception as exc:  # UnidentifiedImageError, truncated data, decompression bombs
        raise InvalidInput(str(path), f"cannot read image ({type(exc).__name__}: {exc})") from exc
    return arr, ("YXC" if arr.ndim == 3 else "YX")


def read_raw(path: Path, max_pixels: int | None, *, mask: bool) -> tuple[np.ndarray, str | None]:
    """The file's array and its axes (None when the file does not say)."""
    check_file(path, mask=mask)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    lower = path.name.lower()
    if lower.endswith(_TIFF_SUFFIXES):
        return _read_tiff(path, limit)
    if lower.endswith(".npy"):
        return _read_npy(path, limit), None
    return _read_pil(path, limit, mask=mask)


def tiff_target(path: Path) -> Path:
    """``path``, checked to be a TIFF name, with its folder created."""
    if not path.name.lower().endswith(_TIFF_SUFFIXES):
        raise InvalidInput(str(path), "can only write TIFF files (.tif, .tiff, .ome.tif)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
