"""Inference: resolve a model name, keep loaded models, segment 2D images and 3D stacks.

``diameter=None`` means *no rescaling* in cellpose 4: the image is segmented
at its own scale. Cellpose-SAM has no size model, so nothing is estimated
(the original service's "auto-detect" wording was wrong). Give ``diameter``
when your objects are far from ~30 px across; the image is then resized by
``30 / diameter`` before the network and the masks are resized back.

Large 2D images are cut by cellpose into 256x256 tiles (``tile_overlap``
apart) and run ``batch_size`` tiles at a time. 3D stacks ``(Z, C, H, W)``
are segmented either as a true 3D volume (``do_3D=True``: the network runs
on YX, ZY and ZX slices and the flows are combined) or plane by plane, with
planes stitched into 3D objects where masks overlap by more than
``stitch_threshold`` IoU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cellpose_finetuning.engine.models import (
    load_cellpose_model,
)
from cellpose_finetuning.engine.resolver import ModelRef, ModelResolver
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.errors import InvalidInput

if TYPE_CHECKING:
    from cellpose.models import CellposeModel

__all__ = [
    "ModelCache",
    "ModelRef",
    "ModelResolver",
    "Segmentation",
    "blockwise_size",
    "check_input_size",
    "lazy_2d_shape",
    "segment",
    "segment_auto",
    "segment_full",
    "segment_many",
    "to_label_dtype",
]


#: Smallest side (Y and X), in pixels, before and after resizing by ``diameter``.
MIN_SIDE = 16
#: Cellpose-SAM's reference diameter: images are resized by ``DIAM_MEAN / diameter``.
DIAM_MEAN = 30.0
#: Above this many pixels (Y x X) a 2D image is segmented block-wise when ``block_size`` is None.
AUTO_BLOCKWISE_PIXELS = 4096 * 4096
#: Working memory of one whole-image pass per pixel (cellpose's ``eval``: 1,812 MiB for 4096²
#: on the CPU, docs/benchmarks.md), rounded up.
SINGLE_PASS_BYTES_PER_PIXEL = 120


def check_input_size(
    image: np.ndarray, diameter: float | None, max_pixels: int, *, name: str
) -> None:
    """Refuse an image that is too small, or too large once resized by ``diameter``.

    Cellpose resizes the image by ``30 / diameter`` before the network, so a
    small ``diameter`` can turn a 64x64 array into gigabytes; the limit
    applies to the resized size.

    Parameters
    ----------
    image : numpy.ndarray
        Canonical (C, H, W) or (Z, C, H, W).
    diameter : float, optional
        The call's ``diameter`` (None: no resizing).
    max_pixels : int
        Largest number of values (all axes) after resizing.
    name : str
        How to name the image in errors.

    Raises
    ------
    InvalidInput
    """
    height, width = image.shape[-2:]
    if min(height, width) < MIN_SIDE:
        raise InvalidInput(
            name, f"image is {height}x{width} pixels; Y and X must be at least {MIN_SIDE}"
        )
    if not diameter:
        return
    scale = DIAM_MEAN / float(diameter)
    new_h, new_w = round(height * scale), round(width * scale)
    values = float(np.prod(image.shape[:-2], dtype="float64")) * new_h * new_w
    if values > max_pixels:
        raise InvalidInput(
            "diameter",
            f"{diameter:g} resizes {name} ({height}x{width}) by {scale:.3g} to {new_h}x{new_w}: "
            f"{values:,.0f} values, more than the limit of {max_pixels:,}; give a larger "
            "diameter or a smaller image",
        )
    if min(new_h, new_w) < MIN_SIDE:
        raise InvalidInput(
            "diameter",
            f"{diameter:g} resizes {name} ({height}x{width}) to {new_h}x{new_w} pixels; "
            f"Y and X must stay at least {MIN_SIDE}: give a smaller diameter",
        )


class ModelCache:
    """Loaded models, least recently used dropped first. Thread-safe.

    Parameters
    ----------
    max_models : int
        How many models to keep loaded.
    device : str, optional
        Torch device for every model.
    """

    def __init__(self, max_models: int = 2, device: str | None = None) -> None:
        self.max_models = max_models
        self.device = device
        self._models: OrderedDict[tuple[str, float], CellposeModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: ModelRef) -> CellposeModel:
        """Load (or reuse) the model behind ``ref``."""
        key = ref.cache_key()
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model, _arch = load_cellpose_model(ref.source, device=self.device)
            self._models[key] = model
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return model

    def __len__(self) -> int:
        return len(self._models)


def to_label_dtype(masks: np.ndarray) -> np.ndarray:
    """uint16 labels, or uint32 when there are more than 65535 objects."""
    masks = np.asarray(masks)
    top = int(masks.max()) if masks.size else 0
    return masks.astype("uint16" if top <= np.iinfo("uint16").max else "uint32", copy=False)


def segment(
    model: CellposeModel,
    image: np.ndarray,
    settings: InferenceSettings | None = None,
    *,
    name: str = "image",
) -> np.ndarray:
    """Segment one image with a loaded model.

    Parameters
    ----------
    model : cellpose.models.CellposeModel
        From :class:`ModelCache` or :func:`load_cellpose_model`.
    image : numpy.ndarray
        Canonical axes: (C, H, W) for 2D, (Z, C, H, W) for a 3D stack
        (see :func:`cellpose_finetuning.io.images.to_canonical`).
    settings : InferenceSettings, optional
        Thresholds, diameter, 3D mode.
    name : str
        How to name the image in error messages.

    Returns
    -------
    numpy.ndarray
        Labels, (H, W) or (Z, H, W); uint16, or uint32 above 65535 objects.
    """
    result = segment_full(model, image, settings, name=name)
    assert result.masks is not None
    return result.masks


@dataclass
class Segmentation:
    """What one image gave: labels, and cellpose's flows when asked for.

    ``flows`` is cellpose's list ``[HSV flow picture (H,W,3) uint8, dP (2,H,W),
    cell probability (H,W)]``; ``masks`` is None when only the network ran
    (``compute_masks=False``).
    """

    masks: np.ndarray | None
    flows: list[np.ndarray] | None = None


def segment_full(
    model: CellposeModel,
    image: np.ndarray,
    settings: InferenceSettings | None = None,
    *,
    name: str = "image",
) -> Segmentation:
    """Segment one image and keep the flows if ``settings`` asks for them.

    See :func:`segment` for the arguments. With ``settings.enable_clahe`` the
    image is equalised first (:func:`~cellpose_finetuning.engine.preprocess.apply_clahe`).
    """
    settings = settings or InferenceSettings()
    image = np.asarray(image)
    if settings.enable_clahe and image.ndim in (3, 4):
        from cellpose_finetuning.engine.preprocess import apply_clahe

        image = apply_clahe(image)
    if image.ndim not in (3, 4):
        raise InvalidInput(name, f"expected (C,H,W) or (Z,C,H,W), got shape {image.shape}")
    is_3d = image.ndim == 4
    if (settings.do_3D or settings.stitch_threshold > 0) and not is_3d:
        raise InvalidInput(name, "do_3D and stitch_threshold need a (Z,C,H,W) stack")
    kwargs: dict[str, Any] = {
        "channel_axis": 0 if not is_3d else 1,
        "diameter": settings.diameter,
        "flow_threshold": settings.flow_threshold,
        "cellprob_threshold": settings.cellprob_threshold,
        "niter": settings.niter,
        "batch_size": settings.batch_size,
        "min_size": settings.min_size,
        "tile_overlap": settings.tile_overlap,
        "bsize": int(model.net.encoder.pos_embed.shape[1] * model.net.ps),
    }
    if is_3d:
        kwargs.update(
            z_axis=0,
            do_3D=settings.do_3D,
            stitch_threshold=settings.stitch_threshold,
            anisotropy=settings.anisotropy,
        )
        if not settings.do_3D and settings.stitch_threshold == 0:
            # Plane by plane without stitching: independent 2D label images.
            plain = settings.model_copy(update={"enable_clahe": False})
            results = [segment_full(model, plane, plain, name=name) for plane in image]
            return Segmentation(
                masks=None
                if not settings.compute_masks
                else to_label_dtype(np.stack([r.masks for r in results])),
                flows=[np.stack(parts) for parts in zip(*(r.flows for r in results), strict=True)]
                if results[0].flows is not None
                else None,
            )
    wants_flows = settings.return_flows or not settings.compute_masks
    masks, flows, _styles = model.eval(
        image.astype("float32", copy=False), compute_masks=settings.compute_masks, **kwargs
    )
    flows_out = [np.asarray(f) for f in flows] if wants_flows else None
    if not settings.compute_masks:
        return Segmentation(masks=None, flows=flows_out)
    masks = np.asarray(masks)
    expected = image.shape[-2:] if not is_3d else (image.shape[0], *image.shape[-2:])
    if masks.shape != tuple(expected):
        masks = masks.reshape(expected)
    return Segmentation(masks=to_label_dtype(masks), flows=flows_out)


def blockwise_size(
    shape: Sequence[int],
    settings: InferenceSettings,
    *,
    available_bytes: int | None = None,
    name: str = "image",
) -> int | None:
    """The block size to segment an image of ``shape`` with, or None for one pass.

    The one rule the CLI, the service, Ray replicas and ``evaluate`` share:
    block-wise when ``settings.block_size`` asks for it, or (``block_size``
    None) when the 2D image has more than :data:`AUTO_BLOCKWISE_PIXELS` pixels
    or one pass would need more than half the available memory; then the block
    comes from the memory (:func:`~cellpose_finetuning.engine.blockwise.choose_block_size`).
    Only what block-wise supports goes block-wise: 2D, no ``diameter``, no
    CLAHE, masks without flows; automatically, anything else runs in one pass
    as before.

    Parameters
    ----------
    shape : sequence of int
        Canonical (C, H, W) (or (H, W)); 4 axes is a 3D stack.
    settings : InferenceSettings
        The call's settings.
    available_bytes : int, optional
        Memory to plan with; default ``psutil.virtual_memory().available``.
    name : str
        How to name the image in errors.

    Returns
    -------
    int or None

    Raises
    ------
    InvalidInput
        ``block_size`` given for what block-wise cannot do.
    """
    unsupported = (
        "a 3D stack"
        if len(shape) == 4
        else "diameter"
        if settings.diameter
        else "enable_clahe"
        if settings.enable_clahe
        else "flows"
        if settings.return_flows or not settings.compute_masks
        else None
    )
    if settings.block_size is not None:
        if unsupported:
            raise InvalidInput(
                "block_size",
                f"block-wise segmentation of {name} cannot be combined with {unsupported} "
                "(leave block_size unset for one pass)",
            )
        return int(settings.block_size)
    if unsupported:
        return None
    height, width = int(shape[-2]), int(shape[-1])
    pixels = height * width
    if available_bytes is None:
        import psutil

        available_bytes = int(psutil.virtual_memory().available)
    if pixels <= AUTO_BLOCKWISE_PIXELS and (
        pixels * SINGLE_PASS_BYTES_PER_PIXEL <= available_bytes // 2
    ):
        return None
    from cellpose_finetuning.engine.blockwise import choose_block_size

    return choose_block_size(available_bytes, overlap=settings.block_overlap)


#: Files read lazily (region by region) for block-wise segmentation.
LAZY_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".zarr")


def lazy_2d_shape(path: Any) -> tuple[int, ...] | None:
    """(C, H, W) of a 2D TIFF/OME-TIFF/Zarr image opened lazily; None for anything else.

    Stacks (more than 4 "channels", or more axes) and other formats are None:
    they are read whole, as before block-wise segmentation existed.
    """
    from pathlib import Path

    from cellpose_finetuning.engine.blockio import open_image

    if Path(path).suffix.lower() not in LAZY_SUFFIXES:
        return None
    try:
        shape = open_image(path).shape
    except Exception:  # a file tifffile/zarr cannot open lazily is read whole,
        return None  # where the reader names what is wrong with it
    return shape if shape[0] <= 4 else None


def segment_auto(
    model: CellposeModel,
    image: Any,
    settings: InferenceSettings | None = None,
    *,
    name: str = "image",
    out: Any = None,
    progress: Any = None,
) -> Any:
    """Segment one image in one pass or block-wise, as :func:`blockwise_size` decides.

    Parameters
    ----------
    model : cellpose.models.CellposeModel
        A loaded model.
    image : numpy.ndarray or path
        Canonical (C, H, W) or (Z, C, H, W) array; or a TIFF/Zarr path of a 2D
        image (read lazily, block-wise whatever its size).
    settings : InferenceSettings, optional
        As for :func:`segment`, plus ``block_size`` and ``block_overlap``.
    name : str
        How to name the image in errors.
    out : path or array, optional
        Block-wise only: where the labels go (a TIFF or ``.zarr`` path is
        written region by region).
    progress : callable, optional
        Block-wise only: called with each
        :class:`~cellpose_finetuning.engine.blockwise.BlockProgress`.

    Returns
    -------
    numpy.ndarray or BlockwiseResult
        The labels of :func:`segment` for an in-memory image without ``out``
        (block-wise labels as uint16/uint32 too); otherwise the
        :class:`~cellpose_finetuning.engine.blockwise.BlockwiseResult`.
    """
    from cellpose_finetuning.engine.blockio import open_image
    from cellpose_finetuning.engine.blockwise import segment_blockwise

    settings = settings or InferenceSettings()
    in_memory = isinstance(image, np.ndarray)
    source = image if in_memory else open_image(image)
    shape = source.shape
    block = blockwise_size(shape, settings, name=name)
    if block is None:
        if in_memory and out is None:
            return segment(model, image, settings, name=name)
        # A file, or an output file: one block as large as the image (the masks of one pass).
        block = max(int(shape[-2]), int(shape[-1]))
    result = segment_blockwise(
        model,
        source,
        settings,
        block_size=block,
        overlap=settings.block_overlap,
        out=out,
        progress=progress,
    )
    if in_memory and out is None:
        return to_label_dtype(result.masks)
    return result


def segment_many(
    model: CellposeModel,
    images: Sequence[np.ndarray],
    settings: InferenceSettings | None = None,
    names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Segment several images one after the other (see :func:`segment`)."""
    names = names or [f"image[{i}]" for i in range(len(images))]
    settings = settings or InferenceSettings()
    if settings.return_flows or not settings.compute_masks:
        # Flows asked for: each item is a Segmentation (labels and flows).
        return [
            segment_full(model, img, settings, name=n)  # type: ignore[misc]
            for img, n in zip(images, names, strict=True)
        ]
    return [
        segment_auto(model, img, settings, name=n) for img, n in zip(images, names, strict=True)
    ]
