"""The mask side of block-wise segmentation: seeds, kept objects, flow check, labels.

Helpers of :mod:`cellpose_finetuning.engine.blockwise` (steps 3 to 5 of its
description): cellpose's mask dynamics on one block in the whole image's
coordinates, the objects a block keeps (the centre decides), their on-disk
store between the two passes, the flow check with the whole image's diffusion
length, and the writing of the labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cellpose_finetuning.engine.blockwise import Block

__all__ = ["ObjectStore", "finish_masks", "keep_centred", "masks_before_flow_check", "write_kept"]


def masks_before_flow_check(
    flows_yx: np.ndarray,
    cellprob: np.ndarray,
    *,
    niter: int,
    cellprob_threshold: float,
    offset: tuple[int, int],
    full_shape: tuple[int, int],
    max_size_fraction: float,
    device: Any,
) -> np.ndarray:
    """``dynamics.compute_masks`` up to its flow check, in the whole image's coordinates.

    cellpose's ``steps_interp`` normalises positions and flows by the array's
    size and samples with ``grid_sample(align_corners=False)``, so where a
    pixel's flow is read depends on the array's size (up to half a pixel off
    at the borders). Here the positions are those of the whole image, as
    ``eval`` keeps them, and each step samples the block at the same
    image position; seeds and masks are cellpose's ``get_masks_torch``.
    """
    import torch
    from cellpose.dynamics import get_masks_torch

    shape = cellprob.shape
    fg = cellprob > cellprob_threshold
    if not fg.any():
        return np.zeros(shape, "uint16")
    inds = np.nonzero(fg)
    flows = flows_yx * fg / 5.0
    n = len(inds[0])
    h, w = shape
    big_h, big_w = full_shape
    oy, ox = offset
    pt = torch.zeros((1, 1, n, 2), dtype=torch.float32)
    im = torch.zeros((1, 2, h, w), dtype=torch.float32)
    pt[0, 0, :, 1] = torch.from_numpy(inds[0] + oy).to(torch.float32)
    pt[0, 0, :, 0] = torch.from_numpy(inds[1] + ox).to(torch.float32)
    im[0, 1] = torch.from_numpy(flows[0])
    im[0, 0] = torch.from_numpy(flows[1])
    norm = np.array([big_w, big_h], "float") - 1  # cellpose's order: x, y
    for k in range(2):
        im[:, k] *= 2.0 / norm[k]
        pt[..., k] /= norm[k]
    pt *= 2
    pt -= 1
    # Whole-image normalised x -> this block's normalised x (align_corners=False)
    # at the same pixel: x_b = x * L / l + (L - 2 o - l) / l, per axis. Steps scale
    # by L / l; the whole image's clamp to [-1, 1] moves with them. One block as
    # large as the image: factor 1, shift 0, cellpose's arithmetic exactly.
    factor = (big_w / w, big_h / h)
    shift = ((big_w - 2 * ox - w) / w, (big_h - 2 * oy - h) / h)
    for k in range(2):
        if factor[k] != 1.0 or shift[k] != 0.0:
            im[:, k] *= factor[k]
            pt[..., k] *= factor[k]
            pt[..., k] += shift[k]
    low = [shift[k] - factor[k] for k in range(2)]
    high = [shift[k] + factor[k] for k in range(2)]
    for _ in range(niter):
        dpt = torch.nn.functional.grid_sample(im, pt, align_corners=False)
        for k in range(2):
            pt[..., k] = torch.clamp(pt[..., k] + dpt[:, k], low[k], high[k])
    for k in range(2):
        if factor[k] != 1.0 or shift[k] != 0.0:
            pt[..., k] -= shift[k]
            pt[..., k] /= factor[k]
    pt += 1
    pt *= 0.5
    for k in range(2):
        pt[..., k] *= norm[k]
    p = pt[..., [1, 0]].squeeze()
    p = p.unsqueeze(0) if p.ndim == 1 else p
    p = p.T.int()
    p[0] -= oy
    p[1] -= ox
    return get_masks_torch(p, inds, shape, max_size_fraction=max_size_fraction)


def finish_masks(
    masks: np.ndarray,
    dp: np.ndarray,
    n_kept: int,
    flow_threshold: float | None,
    min_size: int,
    diffusion_iters: int,
    device: Any,
) -> np.ndarray:
    """cellpose's steps after the seeds: flow check, holes, small objects.

    ``masks`` holds one block's objects: the kept ones as 1..``n_kept``, the
    others (their neighbours) after them. Mask flows diffuse for
    ``diffusion_iters`` steps, the whole image's ``2 x largest extent``
    (``masks_to_flows_gpu``'s default on the whole array), so a kept
    object's flow error is the one ``eval`` computes. Returns the kept
    objects that pass, relabelled 1..n.
    """
    from cellpose import dynamics, utils
    from scipy.ndimage import mean

    bad = np.zeros(0, "int64")
    if flow_threshold is not None and flow_threshold > 0:
        mu = dynamics.masks_to_flows_gpu(masks, device=device, niter=diffusion_iters)
        index = np.arange(1, n_kept + 1)
        errors = np.zeros(index.size)
        for i in range(2):
            errors += mean((mu[i] - dp[i] / 5.0) ** 2, masks, index=index)
        bad = 1 + np.nonzero(errors > flow_threshold)[0]
    masks[masks > n_kept] = 0
    masks[np.isin(masks, bad)] = 0
    return utils.fill_holes_and_remove_small_masks(masks, min_size=min_size)


class ObjectStore:
    """Per block, the kept objects (sparse) and their network flows, on disk.

    Pass 2 needs them after every block has run; on disk they cost no memory.
    """

    def __init__(self, folder: str) -> None:
        from pathlib import Path

        self.folder = Path(folder)
        self.shapes: dict[int, tuple[int, int]] = {}

    def put(self, k: int, masks: np.ndarray, kept: np.ndarray, flows_yx: np.ndarray) -> int:
        """Store block ``k``'s objects, the kept ones first; return the kept ones' largest extent.

        The objects that touch a kept one are stored too: a kept object's
        mask flows at its border read the diffusion ``T`` of the object next
        to it (cellpose's gradient takes the 4-neighbours whatever their
        label), so its flow error depends on its neighbours.
        """
        from scipy.ndimage import find_objects

        self.shapes[k] = masks.shape
        if kept.size == 0:
            return 0
        n = int(masks.max())
        is_kept = np.zeros(n + 1, bool)
        is_kept[kept] = True
        inside = is_kept[masks]
        touching = [
            masks[1:][inside[:-1]],
            masks[:-1][inside[1:]],
            masks[:, 1:][inside[:, :-1]],
            masks[:, :-1][inside[:, 1:]],
        ]
        others = np.unique(np.concatenate(touching))
        others = others[(others > 0) & ~is_kept[others]]
        lut = np.zeros(n + 1, "uint32")
        lut[kept] = np.arange(1, kept.size + 1, dtype="uint32")
        lut[others] = np.arange(kept.size + 1, kept.size + 1 + others.size, dtype="uint32")
        local = lut[masks]
        idx = np.flatnonzero(local)
        np.savez(
            self.folder / f"{k}.npz",
            idx=idx.astype("int64"),
            labels=local.ravel()[idx],
            dp=flows_yx.reshape(2, -1)[:, idx],
            n_kept=np.int64(kept.size),
        )
        slices = find_objects(local, max_label=int(kept.size))
        return max((s[0].stop - s[0].start) + (s[1].stop - s[1].start) + 2 for s in slices if s)

    def get(self, k: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Block ``k``'s masks (kept objects 1..m, then the others), flows and m."""
        path = self.folder / f"{k}.npz"
        if not path.exists():
            return None
        with np.load(path) as data:
            shape = self.shapes[k]
            masks = np.zeros(shape[0] * shape[1], "uint32")
            masks[data["idx"]] = data["labels"]
            dp = np.zeros((2, shape[0] * shape[1]), "float32")
            dp[:, data["idx"]] = data["dp"]
            n_kept = int(data["n_kept"])
        path.unlink()
        return masks.reshape(shape), dp.reshape(2, *shape), n_kept


def keep_centred(masks: np.ndarray, blk: Block, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Labels of ``masks`` whose centroid lies in the block's core; and how many of them are cut."""
    n = int(masks.max())
    if n == 0:
        return np.zeros(0, "int64"), 0
    oh, ow = masks.shape
    flat = masks.ravel()
    counts = np.bincount(flat, minlength=n + 1).astype("float64")
    rows = np.bincount(flat, weights=np.repeat(np.arange(oh, dtype="float64"), ow), minlength=n + 1)
    cols = np.bincount(flat, weights=np.tile(np.arange(ow, dtype="float64"), oh), minlength=n + 1)
    present = counts > 0
    present[0] = False
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.floor(rows / counts) + blk.outer[0].start
        cx = np.floor(cols / counts) + blk.outer[1].start
    (cys, cxs) = blk.core
    inside = present & (cy >= cys.start) & (cy < cys.stop) & (cx >= cxs.start) & (cx < cxs.stop)
    kept = np.nonzero(inside)[0]
    # Objects touching an outer border that is not the image's own border may be cut.
    edges = []
    if blk.outer[0].start > 0:
        edges.append(masks[0])
    if blk.outer[0].stop < shape[0]:
        edges.append(masks[-1])
    if blk.outer[1].start > 0:
        edges.append(masks[:, 0])
    if blk.outer[1].stop < shape[1]:
        edges.append(masks[:, -1])
    touching = np.unique(np.concatenate(edges)) if edges else np.zeros(0, masks.dtype)
    cut = int(np.isin(kept, touching[touching > 0]).sum())
    return kept, cut


def write_kept(target: Any, blk: Block, masks: np.ndarray, kept: np.ndarray, offset: int) -> int:
    """Write the kept objects as labels ``offset+1...``; pixels already labelled stay."""
    if kept.size == 0:
        return 0
    lut = np.zeros(int(masks.max()) + 1, "uint64")
    lut[kept] = np.arange(offset + 1, offset + 1 + kept.size, dtype="uint64")
    new = lut[masks]
    region = np.asarray(target[blk.outer])
    fresh = (new > 0) & (region == 0)
    if fresh.any():
        region = region.copy() if not region.flags.writeable else region
        region[fresh] = new[fresh].astype(region.dtype, copy=False)
        target[blk.outer] = region
    return int(kept.size)
