"""Block-wise 2D segmentation: whole-slide images in memory bounded by the block size.

cellpose's ``eval`` holds every 256² tile of an image, every tile's network
output and the full-size flows at once, so its memory grows with the image.
Here the image is cut into square *blocks* (cores that partition it), each
grown by ``overlap`` pixels on every side (its *outer* region), and only one
block is in memory at a time:

1. **Network.** The tiles are cellpose's own: the same grid that
   ``core.run_net`` lays over the whole padded image (``transforms.make_tiles``
   positions, 256² tiles, ``tile_overlap``). A block runs the tiles that cover
   its outer region, ``batch_size`` at a time, through ``core._forward``, and
   averages them with cellpose's taper mask in the same order as
   ``transforms.average_tiles``. Tiles shared with later blocks are kept
   until the last block that needs them, so each tile runs once and the
   flows of a block are those cellpose computes for the whole image.
2. **Normalisation** uses the whole image's percentiles, computed the way
   ``transforms.normalize99`` does (on the strided subsample above 224³
   pixels), read block by block.
3. **Flow dynamics and seeds** are cellpose's (``dynamics.compute_masks`` up
   to its flow check) with one change: positions stay in the whole image's
   normalised coordinates, as ``eval`` keeps them, and each step samples
   the block at that image position. cellpose normalises by the array's
   size and samples with ``grid_sample(align_corners=False)``, so on a
   smaller array the same pixel would read its flow up to half a pixel
   elsewhere. Seeds and masks: ``get_masks_torch`` on the outer region
   (``max_size_fraction`` scaled to keep the whole image's threshold).
4. **Stitching rule: the centre decides.** A block keeps only the objects
   whose centroid (mean pixel position, floored) lies in its core. Cores
   partition the image, so an object cut by a core border is found whole in
   the outer region of the block that holds its centre, and no other block
   keeps it: it is never split in two. This needs ``overlap`` larger than
   the largest object's extent beyond the core (objects that still touch an
   inner outer border are counted in ``BlockwiseResult.truncated``).
   Overlapping claims (possible only where two blocks segment differently)
   keep the first writer's pixels.
5. **Flow check, second pass.** cellpose's ``remove_bad_flow_masks``
   diffuses each object's mask flows for 2 × the *largest* object's extent
   in the array, so on one block an object's flow error would depend on the
   other objects of that block. The kept objects and their network flows go
   to a temporary folder (sparse, on disk); once every block has run, the
   whole image's diffusion length is known and a second pass over the
   blocks does the flow check with it, then cellpose's
   ``fill_holes_and_remove_small_masks``, and writes the labels.

With the block as large as the image the masks are those of ``eval`` (the
engine's :func:`~cellpose_finetuning.engine.inference.segment`), bit for bit.
With smaller blocks what can still differ: objects whose pixels converge
outside the block's outer region (larger than ``overlap``), float32
rounding of the re-mapped positions (a boundary pixel between touching
objects), and the order of seeds with equal counts.

Input may be a numpy array (or ``np.memmap``), any lazy array with numpy
slicing (zarr), or a TIFF/Zarr path; masks go to an array or a new TIFF/Zarr
(:mod:`cellpose_finetuning.engine.blockio`). The mask side of steps 3 to 5
(seeds, kept objects, flow check, labels) is in
:mod:`cellpose_finetuning.engine.blockmasks`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cellpose_finetuning.engine.blockio import LazyImage, open_image, open_output
from cellpose_finetuning.engine.blockmasks import (
    ObjectStore,
    finish_masks,
    keep_centred,
    masks_before_flow_check,
    write_kept,
)
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.errors import InvalidInput

if TYPE_CHECKING:
    from cellpose.models import CellposeModel

__all__ = [
    "BYTES_PER_PIXEL",
    "DEFAULT_OVERLAP",
    "Block",
    "BlockProgress",
    "BlockwiseResult",
    "choose_block_size",
    "plan_blocks",
    "segment_blockwise",
]

#: Pixels added on every side of a block's core: more than a nucleus or cell
#: is wide at cellpose's scale (~30 px), so objects cut by a core border are
#: whole in the outer region of the block holding their centre.
DEFAULT_OVERLAP = 64
#: Working memory per pixel of a block's outer region (network accumulators,
#: cached tiles, cellpose's dynamics and flow check), measured on CPU.
BYTES_PER_PIXEL = 200
#: Block sides are multiples of this; the largest chosen automatically.
BLOCK_MULTIPLE, MAX_AUTO_BLOCK, MIN_BLOCK = 256, 1024, 256
#: cellpose's percentile normalisation subsamples above this many pixels.
_NORM_SUBSAMPLE = 224**3


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Block:
    """One block: its core (a partition of the image) and its outer region."""

    index: int
    core: tuple[slice, slice]
    outer: tuple[slice, slice]


def plan_blocks(height: int, width: int, block: int, overlap: int) -> list[Block]:
    """Blocks of ``block``² cores in row-major order, each grown by ``overlap`` px.

    The last row and column of cores may be smaller; outer regions are
    clipped to the image.
    """
    if block < 1 or overlap < 0:
        raise InvalidInput("block_size", "block must be >= 1 and overlap >= 0")
    blocks = []
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            y1, x1 = min(y0 + block, height), min(x0 + block, width)
            blocks.append(
                Block(
                    len(blocks),
                    (slice(y0, y1), slice(x0, x1)),
                    (
                        slice(max(0, y0 - overlap), min(height, y1 + overlap)),
                        slice(max(0, x0 - overlap), min(width, x1 + overlap)),
                    ),
                )
            )
    return blocks


def choose_block_size(
    available_bytes: int | None = None,
    *,
    overlap: int = DEFAULT_OVERLAP,
    fraction: float = 0.25,
    largest: int = MAX_AUTO_BLOCK,
) -> int:
    """The block side that keeps one block's working memory within ``fraction`` of RAM.

    Parameters
    ----------
    available_bytes : int, optional
        Memory to plan with; default ``psutil.virtual_memory().available``.
    overlap : int
        Pixels added on every side of a core.
    fraction : float
        Share of ``available_bytes`` one block may use.
    largest : int
        Upper bound: larger blocks save little time (only the overlap is
        computed twice) and make peaks larger.

    Returns
    -------
    int
        A multiple of 256 between 256 and ``largest``.
    """
    if available_bytes is None:
        import psutil

        available_bytes = int(psutil.virtual_memory().available)
    outer = math.isqrt(max(0, int(available_bytes * fraction) // BYTES_PER_PIXEL))
    side = (outer - 2 * overlap) // BLOCK_MULTIPLE * BLOCK_MULTIPLE
    return int(min(max(side, MIN_BLOCK), largest))


# --------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class _ChannelNorm:
    good: bool  # False: the channel is set to 0 (no range, or a zero-padded channel)
    low: Any = 0.0
    span: Any = 1.0  # None: cellpose's "x99 - x01 <= 1e-3" case, the channel becomes 0


def _normalisation(
    img: LazyImage, blocks: list[Block], lower: float, upper: float
) -> list[_ChannelNorm]:
    """Per-channel percentiles of the whole image, as ``normalize_img``/``normalize99`` take them.

    Read core by core; above 224³ pixels only cellpose's strided subsample is kept.
    """
    nchan, height, width = img.shape
    sub = height * width > _NORM_SUBSAMPLE
    sy, sx = (max(1, height // 224), max(1, width // 224)) if sub else (1, 1)
    use = min(nchan, 3)
    lo = np.full(use, np.inf, "float32")
    hi = np.full(use, -np.inf, "float32")
    samples: list[list[np.ndarray]] = [[] for _ in range(use)]
    for blk in blocks:
        ys, xs = blk.core
        part = img.read(ys, xs)[:use].astype("float32", copy=False)
        lo = np.minimum(lo, part.reshape(use, -1).min(axis=1))
        hi = np.maximum(hi, part.reshape(use, -1).max(axis=1))
        fy, fx = (-ys.start) % sy, (-xs.start) % sx  # the global stride's first row/col here
        for c in range(use):
            samples[c].append(part[c, fy::sy, fx::sx].ravel())
        del part
    norms = []
    for c in range(use):
        if not hi[c] - lo[c] > 0:
            norms.append(_ChannelNorm(False))
            continue
        values = np.concatenate(samples[c])
        x01, x99 = np.percentile(values, lower), np.percentile(values, upper)
        norms.append(_ChannelNorm(True, x01, x99 - x01 if x99 - x01 > 1e-3 else None))
    return norms + [_ChannelNorm(False)] * (3 - use)


def _normalised(raw: np.ndarray, norms: list[_ChannelNorm]) -> np.ndarray:
    """(3, h, w) float32 network input from a (C, h, w) region, as cellpose makes it."""
    out = np.zeros((3, *raw.shape[1:]), "float32")
    for c, norm in enumerate(norms):
        if not norm.good or norm.span is None:
            continue
        x = raw[c].astype("float32")
        x -= norm.low
        x /= norm.span
        out[c] = x
    return out


# --------------------------------------------------------------------------- tiles
class _TileGrid:
    """cellpose's tile grid for the whole (padded) image, and a cache of tile outputs."""

    def __init__(self, height: int, width: int, bsize: int, tile_overlap: float) -> None:
        from cellpose import transforms

        self.bsize = bsize
        ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(height, width, min_size=(bsize, bsize))
        self.pad = (ypad1, xpad1)
        ly, lx = height + ypad1 + ypad2, width + xpad1 + xpad2
        overlap = min(0.5, max(0.05, tile_overlap))  # make_tiles' own clamp
        ny = 1 if ly <= bsize else int(np.ceil((1.0 + 2 * overlap) * ly / bsize))
        nx = 1 if lx <= bsize else int(np.ceil((1.0 + 2 * overlap) * lx / bsize))
        # Image coordinates of each tile's first row / column (negative: padding).
        self.ystart = np.linspace(0, ly - bsize, ny).astype(int) - ypad1
        self.xstart = np.linspace(0, lx - bsize, nx).astype(int) - xpad1
        self.taper = transforms._taper_mask(ly=bsize, lx=bsize)
        self.cache: dict[tuple[int, int], np.ndarray] = {}

    def covering(self, ys: slice, xs: slice) -> list[tuple[int, int]]:
        """Tiles (row, col) that overlap the region, in cellpose's order."""
        b = self.bsize
        rows = np.nonzero((self.ystart < ys.stop) & (self.ystart + b > ys.start))[0]
        cols = np.nonzero((self.xstart < xs.stop) & (self.xstart + b > xs.start))[0]
        return [(int(j), int(i)) for j in rows for i in cols]

    def run(
        self, net: Any, img: LazyImage, norms: list[_ChannelNorm], tiles: list, batch: int
    ) -> None:
        """Run the network on the tiles not cached yet."""
        from cellpose.core import _forward

        todo = [t for t in tiles if t not in self.cache]
        if not todo:
            return
        b = self.bsize
        _, height, width = img.shape
        y0 = int(min(self.ystart[j] for j, _ in todo))
        x0 = int(min(self.xstart[i] for _, i in todo))
        y1 = int(max(self.ystart[j] for j, _ in todo)) + b
        x1 = int(max(self.xstart[i] for _, i in todo)) + b
        # Normalised image over the tiles, zero outside it (cellpose pads after normalising).
        span = np.zeros((3, y1 - y0, x1 - x0), "float32")
        ry, rx = slice(max(y0, 0), min(y1, height)), slice(max(x0, 0), min(x1, width))
        span[:, ry.start - y0 : ry.stop - y0, rx.start - x0 : rx.stop - x0] = _normalised(
            img.read(ry, rx), norms
        )
        for k in range(0, len(todo), batch):
            part = todo[k : k + batch]
            stack = np.stack(
                [
                    span[
                        :,
                        self.ystart[j] - y0 : self.ystart[j] - y0 + b,
                        self.xstart[i] - x0 : self.xstart[i] - x0 + b,
                    ]
                    for j, i in part
                ]
            )
            out, _style = _forward(net, stack)
            for t, y in zip(part, out, strict=True):
                self.cache[t] = y

    def average(self, ys: slice, xs: slice) -> np.ndarray:
        """Tile outputs averaged over the region, bit for bit as ``average_tiles`` does."""
        b = self.bsize
        nout = next(iter(self.cache.values())).shape[0]
        yf = np.zeros((nout, ys.stop - ys.start, xs.stop - xs.start), np.float32)
        navg = np.zeros(yf.shape[1:])
        for j, i in self.covering(ys, xs):
            ty, tx = int(self.ystart[j]), int(self.xstart[i])
            a0, a1 = max(ty, ys.start), min(ty + b, ys.stop)
            c0, c1 = max(tx, xs.start), min(tx + b, xs.stop)
            tile_part = self.cache[(j, i)][:, a0 - ty : a1 - ty, c0 - tx : c1 - tx]
            mask_part = self.taper[a0 - ty : a1 - ty, c0 - tx : c1 - tx]
            yf[:, a0 - ys.start : a1 - ys.start, c0 - xs.start : c1 - xs.start] += (
                tile_part * mask_part
            )
            navg[a0 - ys.start : a1 - ys.start, c0 - xs.start : c1 - xs.start] += mask_part
        yf /= navg
        return yf


# --------------------------------------------------------------------------- segmentation
@dataclass(frozen=True)
class BlockProgress:
    """Sent after each block visit: ``done`` of ``total`` steps, objects so far, seconds.

    Each block is visited twice (pass 1: network, dynamics, seeds; pass 2: flow
    check and writing), so ``total`` is twice the number of blocks; ``objects``
    counts objects found in pass 1, written in pass 2.
    """

    done: int
    total: int
    objects: int
    elapsed: float


@dataclass
class BlockwiseResult:
    """What a block-wise run gave.

    ``masks`` is the output array (or the TIFF/Zarr writer); labels run
    1..``n_objects``. ``truncated`` counts kept objects that touch an inner
    border of their outer region: a larger ``overlap`` would see them whole.
    """

    masks: Any
    n_objects: int
    shape: tuple[int, int]
    block_size: int
    overlap: int
    n_blocks: int
    n_tiles: int
    truncated: int = 0
    seconds: float = 0.0
    per_block_objects: list[int] = field(default_factory=list)


def _check_settings(settings: InferenceSettings) -> None:
    if settings.do_3D or settings.stitch_threshold > 0:
        raise InvalidInput("image", "block-wise segmentation is for 2D images")
    if settings.diameter not in (None, 0):
        raise InvalidInput(
            "diameter",
            "block-wise segmentation runs at the image's own scale: leave diameter unset "
            "(resize the image by 30/diameter first if the objects are far from ~30 px)",
        )
    if settings.enable_clahe:
        raise InvalidInput("enable_clahe", "CLAHE needs the whole image; not block-wise")
    if settings.return_flows or not settings.compute_masks:
        raise InvalidInput("return_flows", "block-wise segmentation keeps masks only, not flows")


def segment_blockwise(
    model: CellposeModel,
    image: Any,
    settings: InferenceSettings | None = None,
    *,
    block_size: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    out: Any = None,
    out_dtype: str = "uint32",
    progress: Callable[[BlockProgress], None] | None = None,
) -> BlockwiseResult:
    """Segment a 2D image block by block, in memory bounded by the block size.

    Parameters
    ----------
    model : cellpose.models.CellposeModel
        A loaded model (:class:`~cellpose_finetuning.engine.inference.ModelCache`).
    image : array-like or path
        (H, W) or (C, H, W): a numpy array, a lazy array (zarr, memmap) or a
        TIFF/Zarr path (see :func:`open_image`).
    settings : InferenceSettings, optional
        Thresholds, ``niter``, ``min_size``, ``batch_size``, ``tile_overlap``.
        ``diameter``, CLAHE, 3D and flows are refused (:class:`InvalidInput`).
    block_size : int, optional
        Side of a block's core in pixels; default from available memory
        (:func:`choose_block_size`).
    overlap : int
        Pixels added around each core; must exceed the objects' size.
    out : array-like or path, optional
        Where the (H, W) labels go (see :func:`open_output`); default a new
        numpy array.
    out_dtype : str
        Label dtype of a new output.
    progress : callable, optional
        Called with a :class:`BlockProgress` after each block (both passes:
        ``total`` is twice the number of blocks).

    Returns
    -------
    BlockwiseResult
    """
    import tempfile

    settings = settings or InferenceSettings()
    _check_settings(settings)
    img = open_image(image)
    _, height, width = img.shape
    if min(height, width) < 16:
        raise InvalidInput(
            "image", f"image is {height}x{width} pixels; Y and X must be at least 16"
        )
    block = int(block_size) if block_size else choose_block_size(overlap=overlap)
    if block < 16:
        raise InvalidInput("block_size", f"{block} is too small (at least 16)")
    t0 = time.perf_counter()
    blocks = plan_blocks(height, width, block, overlap)
    target = open_output(out, (height, width), out_dtype)
    norms = _normalisation(img, blocks, 1.0, 99.0)
    net = model.net
    grid = _TileGrid(
        height, width, int(net.encoder.pos_embed.shape[1] * net.ps), settings.tile_overlap
    )
    # Each tile is dropped after the last block that needs it.
    last_use: dict[tuple[int, int], int] = {}
    needed = [grid.covering(*b.outer) for b in blocks]
    for k, tiles in enumerate(needed):
        for t in tiles:
            last_use[t] = k
    niter = settings.niter or 200
    total_px = float(height * width)
    steps = 2 * len(blocks)
    truncated = found = max_ext = 0
    with tempfile.TemporaryDirectory(prefix="cpft-blocks-") as tmp:
        store = ObjectStore(tmp)
        # Pass 1: network, flow dynamics and seeds per block; the objects centred
        # in the core are kept, with their flows, for the flow check.
        for k, blk in enumerate(blocks):
            grid.run(net, img, norms, needed[k], settings.batch_size)
            yf = grid.average(*blk.outer)
            for t in needed[k]:
                if last_use[t] == k:
                    del grid.cache[t]
            masks = masks_before_flow_check(
                yf[:2],
                yf[2],
                niter=niter,
                cellprob_threshold=settings.cellprob_threshold,
                offset=(blk.outer[0].start, blk.outer[1].start),
                full_shape=(height, width),
                max_size_fraction=0.4 * total_px / (yf.shape[1] * yf.shape[2]),
                device=model.device,
            )
            kept, cut = keep_centred(masks, blk, (height, width))
            truncated += cut
            found += int(kept.size)
            max_ext = max(max_ext, store.put(k, masks, kept, yf[:2]))
            del yf, masks
            if progress is not None:
                progress(BlockProgress(k + 1, steps, found, time.perf_counter() - t0))
        # Pass 2: cellpose's flow check with the whole image's diffusion length,
        # then holes and small objects, then the labels are written.
        n_objects = 0
        per_block: list[int] = []
        for k, blk in enumerate(blocks):
            stored = store.get(k)
            if stored is not None:
                masks = finish_masks(
                    *stored,
                    settings.flow_threshold,
                    settings.min_size,
                    2 * max_ext,
                    model.device,
                )
                n_new = write_kept(
                    target, blk, masks, np.arange(1, int(masks.max()) + 1), n_objects
                )
            else:
                n_new = 0
            n_objects += n_new
            per_block.append(n_new)
            if progress is not None:
                progress(
                    BlockProgress(len(blocks) + k + 1, steps, n_objects, time.perf_counter() - t0)
                )
    return BlockwiseResult(
        masks=target,
        n_objects=n_objects,
        shape=(height, width),
        block_size=block,
        overlap=overlap,
        n_blocks=len(blocks),
        n_tiles=len(last_use),
        truncated=truncated,
        seconds=time.perf_counter() - t0,
        per_block_objects=per_block,
    )
