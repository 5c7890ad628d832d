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

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = [
    "CHANNEL_AXIS_RULE",
    "DEFAULT_MAX_PIXELS",
    "MASK_SUFFIXES",
    "SUPPORTED_IMAGE_SUFFIXES",
    "infer_axes",
    "is_image_file",
    "read_image",
    "read_mask",
    "to_canonical",
    "validate_mask",
    "write_image",
    "write_mask",
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
MASK_SUFFIXES = SUPPORTED_IMAGE_SUFFIXES
#: Default limit on the values (all axes together) of one file: 2**31.
DEFAULT_MAX_PIXELS = 2**31
#: The rule of :func:`infer_axes` in one sentence, for error messages and API docs.
CHANNEL_AXIS_RULE = (
    "arrays without axis names are read as: 2-D -> (H, W); 3-D -> (H, W, C) if the last "
    "axis has <= 4 entries and the first > 4, else (C, H, W) if the first has <= 4, else "
    "a grey stack (Z, H, W); 4-D -> (Z, C, H, W) if the second axis has <= 4 entries, else "
    "(Z, H, W, C) if the last has <= 4"
)

_TIFF_SUFFIXES = (".tif", ".tiff")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL modes whose np.asarray is already grey or RGB numbers we can use as they are.
_PIL_DIRECT = {"L", "I", "I;16", "I;16B", "I;16L", "F", "RGB"}
_COLOUR_MASK_HELP = (
    "use a single-channel label image, a palette PNG, or the BioImage.IO Colab RGB "
    "format (id = R*256 + G, blue = 0 everywhere)"
)


def is_image_file(name: str | os.PathLike[str]) -> bool:
    """Whether a file name has a supported image suffix (case-insensitive).

    Examples
    --------
    >>> is_image_file("images/t0000.OME.tif"), is_image_file("labels.geojson")
    (True, False)
    """
    return os.fspath(name).lower().endswith(SUPPORTED_IMAGE_SUFFIXES)


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


def _drop_singletons(arr: np.ndarray, axes: str, keep: str, name: str) -> tuple[np.ndarray, str]:
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


def _merge_channel_axes(arr: np.ndarray, axes: str, name: str) -> tuple[np.ndarray, str]:
    """Map S (samples) to C; when a file has both, one of them must have length 1."""
    if "S" in axes and "C" in axes:
        for letter in "SC":
            i = axes.index(letter)
            if arr.shape[i] == 1:
                return _merge_channel_axes(arr.take(0, axis=i), axes[:i] + axes[i + 1 :], name)
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
    arr, axes = _merge_channel_axes(arr, axes, name)
    arr, axes = _drop_singletons(arr, axes, "ZCYX", name)
    if "Y" not in axes or "X" not in axes:
        raise InvalidInput(name, f"needs Y and X axes, got {axes!r} for shape {arr.shape}")
    if "C" not in axes:
        arr, axes = arr[..., None], axes + "C"
    target = "ZCYX" if "Z" in axes else "CYX"
    out = np.moveaxis(arr, [axes.index(a) for a in target], range(len(target)))
    return np.ascontiguousarray(out)


# ------------------------------------------------------------------ reading files


def _check_file(path: Path, *, mask: bool = False) -> None:
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


def _check_size(path: Path, shape: tuple[int, ...], max_pixels: int) -> None:
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
            _check_size(path, shape, max_pixels)
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
        _check_size(path, mapped.shape, max_pixels)
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
            _check_size(path, (im.height, im.width, len(im.getbands())), max_pixels)
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


def _read_raw(path: Path, max_pixels: int | None, *, mask: bool) -> tuple[np.ndarray, str | None]:
    """The file's array and its axes (None when the file does not say)."""
    _check_file(path, mask=mask)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    lower = path.name.lower()
    if lower.endswith(_TIFF_SUFFIXES):
        return _read_tiff(path, limit)
    if lower.endswith(".npy"):
        return _read_npy(path, limit), None
    return _read_pil(path, limit, mask=mask)


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
    arr, axes = _read_raw(path, max_pixels, mask=False)
    return to_canonical(arr, axes, name=str(path))


# ------------------------------------------------------------------ masks


def _check_labels(arr: np.ndarray, name: str) -> None:
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
    _check_labels(arr, name)
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
        arr, axes = _merge_channel_axes(arr, axes, name)
        # Only a real colour axis or a real stack survives; length-1 C and Z go.
        keep = "".join(a for a in "ZC" if a in axes and arr.shape[axes.index(a)] > 1)
        arr, axes = _drop_singletons(arr, axes, keep + "YX", name)
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
    _check_file(path, mask=True)
    if expected_shape is not None:
        _check_size(path, tuple(expected_shape), max_pixels or DEFAULT_MAX_PIXELS)
    labels = read_annotation_labels(path, expected_shape)
    if labels is not None:
        return validate_mask(labels, str(path), expected_shape)
    arr, axes = _read_raw(path, max_pixels, mask=True)
    return validate_mask(_mask_labels(arr, axes, str(path)), str(path), expected_shape)


# ------------------------------------------------------------------ writing


def _tiff_target(path: Path) -> Path:
    if not path.name.lower().endswith(_TIFF_SUFFIXES):
        raise InvalidInput(str(path), "can only write TIFF files (.tif, .tiff, .ome.tif)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


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

    path = _tiff_target(Path(path))
    arr = np.asarray(mask)
    _check_labels(arr, str(path))
    top = int(arr.max())
    tifffile.imwrite(path, arr.astype("uint16" if top <= 65535 else "uint32"), compression="zlib")
    return path


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

    path = _tiff_target(Path(path))
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
