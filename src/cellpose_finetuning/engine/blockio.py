"""Lazy reading and writing of 2D images region by region, for block-wise segmentation.

Images larger than memory stay on disk: an uncompressed TIFF is memory-mapped
anew for each region (so pages read once leave the process again), other
TIFFs and Zarr folders are read through zarr (``tifffile.imread(aszarr=True)``).
Labels go to a numpy array, a lazy array, a new BigTIFF written region by
region (``tifffile.memmap``) or a Zarr array.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = ["LazyImage", "open_image", "open_output"]


class LazyImage:
    """A 2D image read region by region, with canonical axes (C, H, W).

    Parameters
    ----------
    source : array-like
        ``(H, W)`` or ``(C, H, W)``; anything with ``shape`` and numpy slicing.
    reopen : callable, optional
        Returns a fresh ``source`` for each read (used for memory maps, so
        that pages read once are unmapped again).
    """

    def __init__(self, source: Any, reopen: Callable[[], Any] | None = None) -> None:
        shape = tuple(int(s) for s in source.shape)
        if len(shape) not in (2, 3):
            raise InvalidInput("image", f"expected (H,W) or (C,H,W), got shape {shape}")
        self._source = None if reopen else source
        self._reopen = reopen
        self._2d = len(shape) == 2
        self.shape: tuple[int, int, int] = (1, *shape) if self._2d else shape  # type: ignore[assignment]
        self.dtype = np.dtype(source.dtype)

    def read(self, ys: slice, xs: slice) -> np.ndarray:
        """The region ``[:, ys, xs]`` as a numpy array."""
        src = self._reopen() if self._reopen else self._source
        try:
            region = src[ys, xs] if self._2d else src[:, ys, xs]
            region = np.array(region)  # a copy: nothing keeps the map alive
        finally:
            if self._reopen:
                del src
        return region[None] if self._2d else region


def open_image(image: Any) -> LazyImage:
    """Wrap an array, a lazy array or a TIFF/Zarr path as a :class:`LazyImage`.

    A path to an uncompressed TIFF is memory-mapped anew for every region;
    other TIFFs and ``.zarr`` folders are read through zarr.
    """
    if isinstance(image, LazyImage):
        return image
    if isinstance(image, str | Path):
        path = Path(image)
        if path.suffix == ".zarr" or path.is_dir():
            return LazyImage(_zarr().open(str(path), mode="r"))
        import tifffile

        try:
            first = tifffile.memmap(path, mode="r")
        except ValueError:  # compressed or not contiguous: tiles through zarr
            store = tifffile.imread(path, aszarr=True)
            return LazyImage(_zarr().open(store, mode="r"))
        shape = first.shape
        del first
        if len(shape) == 3 and shape[-1] <= 4 < shape[0]:  # (H, W, C) on disk

            class _Hwc:
                def __init__(self) -> None:
                    self.shape, self.dtype = (shape[2], *shape[:2]), tifffile.memmap(path).dtype

                def __getitem__(self, key: Any) -> np.ndarray:
                    arr = tifffile.memmap(path, mode="r")
                    return np.moveaxis(arr[key[1], key[2]], -1, 0)

            return LazyImage(_Hwc())
        return LazyImage(
            tifffile.memmap(path, mode="r"), reopen=lambda: tifffile.memmap(path, mode="r")
        )
    return LazyImage(image)


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InvalidInput(
            "image", "compressed TIFF and Zarr images need the zarr package (pip install zarr)"
        ) from exc
    return zarr


class _TiffOutput:
    """An uncompressed (Big)TIFF label image written region by region."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype: str) -> None:
        import tifffile

        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        mm = tifffile.memmap(path, shape=shape, dtype=dtype, bigtiff=True)
        mm.flush()
        del mm

    def _map(self) -> np.memmap:
        import tifffile

        return tifffile.memmap(self.path, mode="r+")

    def __getitem__(self, key: Any) -> np.ndarray:
        mm = self._map()
        out = np.array(mm[key])
        del mm
        return out

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        mm = self._map()
        mm[key] = value
        mm.flush()
        del mm


def open_output(out: Any, shape: tuple[int, int], dtype: str = "uint32") -> Any:
    """Where the labels go: an array as given, a new TIFF (path) or Zarr (``.zarr`` path).

    ``None`` makes a zeroed numpy array of ``shape``.
    """
    if out is None:
        return np.zeros(shape, dtype)
    if isinstance(out, str | Path):
        path = Path(out)
        if path.suffix == ".zarr":
            chunks = (min(shape[0], 1024), min(shape[1], 1024))
            return _zarr().open(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype)
        return _TiffOutput(path, shape, dtype)
    if tuple(out.shape) != tuple(shape):
        raise InvalidInput("out", f"has shape {tuple(out.shape)}, the image is {shape}")
    return out
