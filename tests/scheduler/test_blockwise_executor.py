"""The inference executor's block-wise path (#22): progress from its worker thread, errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellpose_finetuning.engine.blockwise import segment_blockwise
from cellpose_finetuning.engine.inference import ModelCache, ModelRef
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.scheduler import LocalInference


async def test_segment_file_streams_each_block_and_writes_the_engines_labels(
    tiny_model, dev_data, tmp_path
):
    img = tifffile.imread(dev_data / "images" / "test" / "nuclei_03.tif")
    tifffile.imwrite(tmp_path / "in.tif", img)
    ref = ModelRef("tiny", str(tiny_model), "checkpoint")
    settings = InferenceSettings(block_size=128, cellprob_threshold=-3.0)
    seen: list[dict] = []
    summary = await LocalInference().segment_file(
        ref, str(tmp_path / "in.tif"), str(tmp_path / "out.tif"), settings, progress=seen.append
    )
    # Two passes over the 4 blocks: network and seeds, then flow check and writing.
    assert [u["done"] for u in seen] == list(range(1, 9)) and {u["total"] for u in seen} == {8}
    assert summary["n_blocks"] == 4 and summary["shape"] == list(img.shape)
    expected = segment_blockwise(
        ModelCache().get(ref), tmp_path / "in.tif", settings, block_size=128
    ).masks
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), expected)
    assert summary["n_objects"] == int(expected.max()) == seen[-1]["objects"]


async def test_segment_file_raises_the_engines_error(tiny_model, tmp_path):
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((8, 8), "uint16"))
    ref = ModelRef("tiny", str(tiny_model), "checkpoint")
    with pytest.raises(InvalidInput, match="at least 16"):
        await LocalInference().segment_file(
            ref, str(tmp_path / "small.tif"), str(tmp_path / "o.tif"), InferenceSettings()
        )
