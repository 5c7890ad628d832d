"""Block-wise segmentation (#22): same masks as one pass, no object split by a block border."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellpose_finetuning.engine.blockio import open_image
from cellpose_finetuning.engine.blockwise import (
    BYTES_PER_PIXEL,
    choose_block_size,
    plan_blocks,
    segment_blockwise,
)
from cellpose_finetuning.engine.inference import ModelCache, ModelRef, segment
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.errors import InvalidInput

BLOCK, SIZE = 384, 1024


def _tiled_nuclei(dev_data, size: int) -> np.ndarray:
    """The dev nuclei image mirrored and tiled to size x size (seamless), float32."""
    img = tifffile.imread(dev_data / "images" / "test" / "nuclei_03.tif").astype("float32")
    quad = np.block([[img, img[:, ::-1]], [img[::-1, :], img[::-1, ::-1]]])
    reps = -(-size // quad.shape[0]), -(-size // quad.shape[1])
    return np.ascontiguousarray(np.tile(quad, reps)[:size, :size])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between the labels of two label images (row/col 0 = background)."""
    from cellpose.metrics import _intersection_over_union

    return _intersection_over_union(a.astype("int64"), b.astype("int64"))


@pytest.fixture(scope="module")
def model(learned_tiny):
    return ModelCache().get(ModelRef("nuclei", str(learned_tiny), "checkpoint"))


@pytest.fixture(scope="module")
def nuclei(dev_data):
    return _tiled_nuclei(dev_data, SIZE)


@pytest.fixture(scope="module")
def single_pass(model, nuclei):
    masks = segment(model, nuclei[None])
    assert masks.max() > 300  # the trained network finds the nuclei
    return masks


@pytest.fixture(scope="module")
def blockwise(model, nuclei):
    seen = []
    result = segment_blockwise(model, nuclei, block_size=BLOCK, progress=seen.append)
    return result, seen


def test_cores_partition_the_image():
    blocks = plan_blocks(1000, 700, 384, 64)
    cover = np.zeros((1000, 700), int)
    for b in blocks:
        cover[b.core] += 1
        assert b.outer[0].start == max(0, b.core[0].start - 64)
        assert b.outer[1].stop == min(700, b.core[1].stop + 64)
    assert (cover == 1).all()
    assert len(blocks) == 3 * 2


def test_block_as_large_as_the_image_gives_the_engines_masks(model, dev_data):
    # Not square, not a multiple of 16: cellpose pads it; the tile grid is its own.
    image = _tiled_nuclei(dev_data, 600)[:, :520]
    expected = segment(model, image[None])
    result = segment_blockwise(model, image, block_size=600)
    assert result.n_blocks == 1
    assert expected.max() > 100
    np.testing.assert_array_equal(result.masks, expected)


def test_blocks_of_384_match_the_single_pass(single_pass, blockwise):
    from cellpose.metrics import average_precision

    result, _ = blockwise
    assert result.n_blocks == 9 and result.truncated == 0
    ap, tp, fp, fn = average_precision(single_pass.astype("int32"), result.masks.astype("int32"))
    assert ap[0] >= 0.99, (ap, tp, fp, fn)
    # Same tile outputs, so nearly every object is the same to the pixel.
    iou = _iou(single_pass, result.masks)[1:, 1:]
    exact = int((iou.max(axis=1) == 1.0).sum())
    assert exact >= 0.98 * single_pass.max()


def test_objects_across_block_borders_stay_whole(single_pass, blockwise):
    result, _ = blockwise
    masks = result.masks
    borders = [BLOCK, 2 * BLOCK]
    crossing = set()
    for b in borders:  # labels present on both sides of a core border
        crossing |= set(np.intersect1d(single_pass[b - 1], single_pass[b]).tolist())
        crossing |= set(np.intersect1d(single_pass[:, b - 1], single_pass[:, b]).tolist())
    crossing.discard(0)
    assert len(crossing) > 20  # the borders do cut through nuclei
    iou = _iou(single_pass, masks)
    for label in crossing:
        pixels = masks[single_pass == label]
        labels, counts = np.unique(pixels[pixels > 0], return_counts=True)
        # One block-wise object holds the nucleus; no second one takes a piece of it.
        assert counts.max() >= 0.9 * pixels.size, (label, labels, counts)
        assert iou[label].max() >= 0.9
    # And no block-wise object is cut along a core border.
    for b in borders:
        for cut in (masks[b - 1 : b + 1], masks[:, b - 1 : b + 1].T):
            for lab in np.intersect1d(cut[0], cut[1]):
                assert lab == 0 or (masks == lab).sum() >= 15


def test_progress_reports_every_block(blockwise):
    result, seen = blockwise
    assert [p.done for p in seen] == list(range(1, result.n_blocks + 1))
    assert {p.total for p in seen} == {result.n_blocks}
    assert seen[-1].objects == result.n_objects == int(result.masks.max())
    assert len(np.unique(result.masks)) == result.n_objects + 1  # labels 1..n, none lost


def test_tiff_in_tiff_out_matches_in_memory(model, nuclei, blockwise, tmp_path):
    source = tmp_path / "slide.tif"
    tifffile.imwrite(source, nuclei.astype("uint16"))  # uncompressed: read by memmap
    assert open_image(source).shape == (1, SIZE, SIZE)
    in_memory = segment_blockwise(model, nuclei.astype("uint16"), block_size=512)
    on_disk = segment_blockwise(model, source, block_size=512, out=tmp_path / "masks.tif")
    assert on_disk.n_objects == in_memory.n_objects
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "masks.tif"), in_memory.masks)


def test_block_size_follows_available_memory():
    small = choose_block_size(200 * 2**20, overlap=64)
    large = choose_block_size(8 * 2**30, overlap=64)
    assert small % 256 == 0 and large % 256 == 0
    assert 256 <= small < large <= 2048
    # One block's working memory stays within the planned share.
    assert (small + 128) ** 2 * BYTES_PER_PIXEL <= 0.25 * 200 * 2**20


@pytest.mark.parametrize(
    "settings",
    [
        InferenceSettings(diameter=15),
        InferenceSettings(enable_clahe=True),
        InferenceSettings(return_flows=True),
    ],
)
def test_refuses_what_needs_the_whole_image(model, settings):
    with pytest.raises(InvalidInput):
        segment_blockwise(model, np.zeros((64, 64), "float32"), settings, block_size=256)
