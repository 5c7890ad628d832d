"""Slow: a session trained on the dev set, exported in the standard form, against the engine.

Whole images are tiled differently by cellpose (blended overlapping tiles, zero border after
normalising) and by bioimage.io (cropped halos, reflected raw border), so masks are compared
object by object (AP@0.5) rather than pixel by pixel; the package must also reload in
``infer --model package.zip`` with exactly the session's masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.export import bioimageio as bx
from cellpose_finetuning.export.bioimageio import standard as std

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(demo_run):
    """The demo's session: the tiny network trained from scratch on the dev nuclei."""
    from cellpose_finetuning.engine.sessions import Session

    session = Session(demo_run[0] / "session")
    assert session.read_status().status_type == "completed"
    return session


@pytest.fixture(scope="module")
def nuclei_tests(test_pairs):
    """The dev test images of the kind the demo trained on (its own test set)."""
    pairs = [pair for pair in test_pairs if pair[0].name.startswith("nuclei_")]
    assert pairs
    return pairs


@pytest.fixture(scope="module")
def package(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "model.zip"
    report = bx.export_command_impl(trained.path, out)
    return Path(report["zip_path"])


def _ap50(truth: np.ndarray, pred: np.ndarray) -> float:
    from cellpose.metrics import average_precision

    ap, *_ = average_precision([truth.astype("int32")], [pred.astype("int32")], threshold=[0.5])
    return float(ap[0][0])


@pytest.mark.parametrize("weight_format", std.WEIGHT_FORMATS)
def test_whole_images_segment_like_the_engine(package, trained, nuclei_tests, weight_format):
    from cellpose_finetuning.engine.inference import ModelCache, ModelResolver, segment
    from cellpose_finetuning.io.images import read_image

    model = ModelCache(device="cpu").get(ModelResolver(allow_paths=True).resolve(str(trained.path)))
    for path, _ in nuclei_tests:
        image = read_image(path)
        expected = segment(model, image, InferenceSettings())
        labels = std.predict_image(package, image, weight_format)
        assert labels.shape == expected.shape
        assert expected.max() > 0, f"the trained model finds nothing in {path.name}"
        # bioimage.io's own tiling of a whole image (blocks with a halo, here 4 for 256²) is
        # not cellpose's (one blended tile): measured AP@0.5 0.92 on nuclei_03 for every
        # format (2 of 25 objects missed, none added); on the package's own sample tile the
        # masks are identical (test_package_labels_on_its_tile_match_the_engine).
        assert _ap50(expected, labels) >= 0.9, (path.name, weight_format)


def test_package_reloads_in_infer_with_the_sessions_masks(package, trained, nuclei_tests):
    from cellpose_finetuning.engine.inference import ModelCache, ModelResolver, segment
    from cellpose_finetuning.io.images import read_image

    resolver, cache = ModelResolver(allow_paths=True), ModelCache(device="cpu")
    for path, _ in nuclei_tests:
        image = read_image(path)
        ours = segment(cache.get(resolver.resolve(str(package))), image)
        session = segment(cache.get(resolver.resolve(str(trained.path))), image)
        np.testing.assert_array_equal(ours, session)
