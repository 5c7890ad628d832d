"""Block-wise segmentation through the CLI (#22): ``infer`` and ``evaluate`` with --block-size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cellpose_finetuning.cli import main
from cellpose_finetuning.engine.blockwise import segment_blockwise
from cellpose_finetuning.engine.inference import (
    ModelCache,
    ModelRef,
    blockwise_size,
    segment,
    segment_auto,
)
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.errors import InvalidInput

BLOCK = 128


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def model(learned_tiny):
    return ModelCache().get(ModelRef("nuclei", str(learned_tiny), "checkpoint"))


@pytest.fixture(scope="module")
def slide(tmp_path_factory, dev_data):
    """The dev nuclei mirrored to 384², as an uncompressed uint16 TIFF (memory-mapped)."""
    img = tifffile.imread(dev_data / "images" / "test" / "nuclei_03.tif").astype("float32")
    quad = np.block([[img, img[:, ::-1]], [img[::-1, :], img[::-1, ::-1]]])[:384, :384]
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    tifffile.imwrite(path, (quad / quad.max() * 60000).astype("uint16"))
    return path


def test_the_rule_sends_only_what_blockwise_supports():
    settings = InferenceSettings()
    plenty = 64 * 1024**3
    assert blockwise_size((1, 2048, 2048), settings, available_bytes=plenty) is None
    auto = blockwise_size((1, 8192, 8192), settings, available_bytes=plenty)
    assert auto is not None and auto % 256 == 0
    # Too large for the memory one pass needs: block-wise although small in pixels.
    assert blockwise_size((1, 2048, 2048), settings, available_bytes=256 * 1024**2) is not None
    # Automatically, what block-wise cannot do stays one pass; asked for, it is refused.
    for update in ({"diameter": 17.0}, {"enable_clahe": True}, {"return_flows": True}):
        assert blockwise_size((1, 8192, 8192), settings.model_copy(update=update)) is None
        with pytest.raises(InvalidInput, match="block_size"):
            blockwise_size((1, 512, 512), settings.model_copy(update={**update, "block_size": 256}))
    assert blockwise_size((2, 1, 512, 512), settings) is None  # a 3D stack
    assert blockwise_size((1, 512, 512), InferenceSettings(block_size=256)) == 256


def test_normal_images_keep_the_single_pass_masks(model, slide):
    image = tifffile.imread(slide)[None].astype("float32")
    np.testing.assert_array_equal(segment_auto(model, image), segment(model, image))


def test_cli_infer_blockwise_writes_the_engines_masks(model, learned_tiny, slide, tmp_path):
    code, out = _run(
        "infer",
        "--model",
        str(learned_tiny),
        str(slide),
        "--out",
        str(tmp_path),
        "--block-size",
        str(BLOCK),
        "--json",
    )
    assert code == 0, out
    (entry,) = json.loads(out)
    assert entry["blockwise"]["n_blocks"] == 9 and entry["blockwise"]["block_size"] == BLOCK
    written = tifffile.imread(entry["masks"])
    expected = segment_blockwise(model, slide, block_size=BLOCK).masks
    assert expected.max() > 20  # the trained network finds the nuclei
    np.testing.assert_array_equal(written, expected)
    assert entry["n_objects"] == int(expected.max())


def test_cli_infer_blockwise_reports_its_blocks(learned_tiny, slide, tmp_path):
    code, out = _run(
        "infer", "--model", str(learned_tiny), str(slide), "--out", str(tmp_path),
        "--block-size", str(BLOCK), "--save", "rois",
    )  # fmt: skip
    assert code == 0, out
    assert "9 blocks of 128²" in out and "not written block-wise: rois" in out


def test_cli_evaluate_with_a_block_size_scores_the_blockwise_masks(
    model, learned_tiny, dev_data, tmp_path
):
    code, out = _run(
        "evaluate", "--model", str(learned_tiny),
        "--images", f"{dev_data}/images/test/", "--annotations", f"{dev_data}/annotations/test/",
        "--out", str(tmp_path), "--block-size", str(BLOCK), "--json",
    )  # fmt: skip
    assert code == 0, out
    report = json.loads(out)
    assert report["inference"]["block_size"] == BLOCK
    from cellpose_finetuning.cli.training import local_pairs
    from cellpose_finetuning.engine.evaluation import load_labelled
    from cellpose_finetuning.engine.metrics import score_masks

    pairs = local_pairs(
        f"{dev_data}/images/test/", f"{dev_data}/annotations/test/", "--images", "--annotations"
    )
    data = load_labelled(pairs)
    preds = [segment_blockwise(model, img, block_size=BLOCK).masks for _, img, _ in data]
    metrics, _ = score_masks([m for _, _, m in data], preds, [n for n, _, _ in data])
    (scored,) = report["models"]
    assert scored["metrics"]["n_pred"] == metrics.n_pred
    assert scored["metrics"]["ap_0_5"] == pytest.approx(metrics.ap_0_5)
