"""cellpose's own files: the GUI's ``_seg.npy`` (read safely, written) and ``_cp_masks.png``.

``_seg.npy`` files are pickles; they are read with a restricted unpickler
that builds only numpy arrays, dtypes, numpy scalars and plain containers
(dict, list, tuple, str, numbers, None), so a crafted file cannot run code.
They are written with cellpose's ``io.masks_flows_to_seg`` (which the GUI
opens) and ``_cp_masks.png`` with ``io.save_masks``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.output_names import labels_2d, output_stem

__all__ = [
    "npy_holds_objects",
    "read_seg_npy",
    "seg_masks",
    "write_cp_masks_png",
    "write_seg_npy",
]


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars and plain containers; nothing else."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: a _seg.npy holds only numpy arrays and "
            "plain values, this file would run other code"
        )


def _npy_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh, max_header_size=100_000)
    return np.lib.format.read_array_header_2_0(fh, max_header_size=100_000)


def npy_holds_objects(path: str | os.PathLike[str]) -> bool:
    """Whether a ``.npy`` file holds pickled Python objects (a ``_seg.npy`` does)."""
    try:
        with open(path, "rb") as fh:
            return bool(_npy_header(fh)[2].hasobject)
    except Exception:  # not a .npy at all: the ordinary reader names the problem
        return False


def read_seg_npy(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a cellpose GUI ``_seg.npy`` without running code from it.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    dict
        Its entries (``masks``, ``outlines``, ``flows``, ...).

    Raises
    ------
    InvalidInput
        Naming the file: not a ``.npy``, a pickle that asks for anything but
        numpy arrays and plain values (it is refused before it runs), not a dict.
    """
    name = str(path)
    try:
        with open(path, "rb") as fh:
            _shape, _fortran, dtype = _npy_header(fh)
            if not dtype.hasobject:
                raise InvalidInput(name, "is a plain array, not a cellpose _seg.npy dictionary")
            obj = _RestrictedUnpickler(fh).load()
    except InvalidInput:
        raise
    except pickle.UnpicklingError as exc:
        raise InvalidInput(name, f"unsafe or corrupt _seg.npy: {exc}") from None
    except Exception as exc:
        raise InvalidInput(name, f"cannot read _seg.npy ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise InvalidInput(
            name, f"holds a {type(obj).__name__}, not a cellpose _seg.npy dictionary"
        )
    return obj


def seg_masks(path: Path) -> np.ndarray:
    """The labels of a ``_seg.npy`` (its ``masks`` entry, -1 for "no mask" shifted to 0)."""
    dat = read_seg_npy(path)
    if "masks" not in dat:
        keys = ", ".join(sorted(map(str, dat))) or "none"
        raise InvalidInput(
            str(path), f"this _seg.npy has no 'masks' entry (keys: {keys}); save it from the GUI"
        )
    masks = dat["masks"]
    if not isinstance(masks, np.ndarray):
        raise InvalidInput(str(path), f"'masks' is a {type(masks).__name__}, not an array")
    masks = np.squeeze(masks) if masks.ndim > 2 and 1 in masks.shape[:-2] else masks
    # The GUI marks "no mask" as -1 in some versions (it adds 1 when loading).
    if masks.dtype.kind == "i" and masks.size and masks.min() == -1:
        masks = masks + 1
    return masks


def _flows_from_masks(masks: np.ndarray) -> list[np.ndarray]:
    """Flows in cellpose's layout for masks that come without the network's flows.

    The cell probability is +5 inside objects and -5 outside; the XY flows are
    zero (cellpose computes true flows from masks by diffusion, seconds per
    image on a CPU, and the GUI only shows them). Pass the network's flows to
    :func:`write_seg_npy` when you have them.
    """
    h, w = masks.shape
    return [
        np.zeros((h, w, 3), "uint8"),
        np.zeros((2, h, w), "float32"),
        np.where(masks > 0, 5.0, -5.0).astype("float32"),
    ]


def _image_for_seg(image: np.ndarray | None, masks: np.ndarray) -> np.ndarray:
    if image is None:
        return np.zeros(masks.shape, "float32")
    img = np.asarray(image)
    return img[0] if img.ndim == 3 and img.shape[0] == 1 else img


def write_seg_npy(
    out_dir: str | os.PathLike[str],
    image_name: str,
    masks: np.ndarray,
    image: np.ndarray | None = None,
    flows: list[np.ndarray] | None = None,
) -> Path:
    """Write ``<stem>_seg.npy`` with cellpose's own ``io.masks_flows_to_seg``.

    ``flows`` are ``model.eval``'s flows when given; otherwise flows made from
    the masks (see :func:`_flows_from_masks`). The GUI opens the file when its
    image lies beside it (its ``filename`` is the image's name in ``out_dir``):
    open the image in the GUI, or drop the ``_seg.npy`` on it.
    """
    from cellpose import io as cp_io

    masks = labels_2d(masks, "seg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(image_name)
    file_name = str(out_dir / (stem + os.path.splitext(image_name)[1]))
    cp_io.masks_flows_to_seg(
        _image_for_seg(image, masks), masks, flows or _flows_from_masks(masks), file_name
    )
    return out_dir / f"{stem}_seg.npy"


def write_cp_masks_png(out_dir: str | os.PathLike[str], image_name: str, masks: np.ndarray) -> Path:
    """Write ``<stem>_cp_masks.png`` (16-bit) with cellpose's ``io.save_masks``."""
    from cellpose import io as cp_io

    masks = labels_2d(masks, "png")
    if masks.max() > 65535:
        raise InvalidInput("save", "more than 65535 objects do not fit in a 16-bit PNG; use tif")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(image_name)
    target = out_dir / f"{stem}_cp_masks.png"
    if masks.max() == 0:
        # save_masks writes nothing for an empty result; its own imsave writes the empty PNG.
        cp_io.imsave(str(target), masks.astype("uint16"))
    else:
        cp_io.save_masks(
            None,
            masks.astype("uint16"),
            None,
            str(out_dir / image_name),
            png=True,
            tif=False,
            savedir=str(out_dir),
        )
    return target
