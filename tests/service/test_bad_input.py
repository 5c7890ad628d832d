"""Bad input against the running service: a clear error naming the argument or file.

After every case the service must still answer a good call.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellpose_finetuning.client import follow, upload_folder
from tests.helpers import forge_tiff_size

pytestmark = pytest.mark.stack

GOOD = np.random.default_rng(0).integers(0, 255, (64, 64), dtype="uint8")


@pytest.fixture(scope="module")
async def frank(running_stack):
    server = await running_stack.connect("frank")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
async def bad_dataset(frank, dev_data, tmp_path_factory):
    """A dataset with one good pair and one broken file of each kind."""
    root = tmp_path_factory.mktemp("bad")
    img = tifffile.imread(dev_data / "images/train/nuclei_00.tif")
    mask = tifffile.imread(dev_data / "annotations/train/nuclei_00.tif")
    for sub in (
        "images/good",
        "annotations/good",
        "images/float",
        "annotations/float",
        "images/neg",
        "annotations/neg",
        "images/size",
        "annotations/size",
        "images/none",
        "annotations/none",
        "files",
    ):
        (root / sub).mkdir(parents=True)
    tifffile.imwrite(root / "images/good/a.tif", img)
    tifffile.imwrite(root / "annotations/good/a.tif", mask)
    for kind, bad_mask in (
        ("float", mask.astype("float32") + 0.5),
        ("neg", mask.astype("int32") - 1),
        ("size", mask[:100, :100]),
        ("none", np.zeros_like(mask)),
    ):
        tifffile.imwrite(root / f"images/{kind}/x.tif", img)
        tifffile.imwrite(root / f"annotations/{kind}/x.tif", bad_mask)
    (root / "files/empty.tif").write_bytes(b"")
    (root / "files/corrupt.tif").write_bytes(b"II*\x00" + b"\x13" * 64)
    tifffile.imwrite(root / "files/huge.tif", np.zeros((10, 10), "uint8"), metadata=None)
    forge_tiff_size(root / "files/huge.tif", 50_000, 50_000)  # 2.5 GB declared in ~300 bytes
    server, _ = frank
    return await upload_folder(server, root, alias="bad-data")


async def _still_serving(svc) -> None:
    result = await svc.infer(model="tiny", input_arrays=[GOOD])
    assert result[0]["output"].shape == (64, 64)


INFER_CASES = [
    ({"model": "no-such-model", "input_arrays": [GOOD]}, "model not found"),
    ({"model": "../models/tiny", "input_arrays": [GOOD]}, "model"),
    ({"model": "a/b", "input_arrays": [GOOD]}, "model"),
    ({"model": "tiny", "input_arrays": [np.array(5.0)]}, r"input_arrays\[0\]"),
    ({"model": "tiny", "input_arrays": [np.zeros(10)]}, r"input_arrays\[0\]"),
    ({"model": "tiny", "input_arrays": [np.zeros((2, 2, 2, 2, 2))]}, r"input_arrays\[0\]"),
    ({"model": "tiny", "input_arrays": [np.full((32, 32), np.nan)]}, "NaN"),
    ({"model": "tiny", "input_arrays": [np.full((32, 32), np.inf)]}, "NaN or infinite"),
    ({"model": "tiny", "input_arrays": [np.zeros((32, 32), bool)]}, "pixel type"),
    ({"model": "tiny", "input_arrays": [np.zeros((32, 32), complex)]}, "pixel type"),
    ({"model": "tiny", "input_arrays": [np.zeros((0, 0))]}, "empty"),
    ({"model": "tiny", "input_arrays": []}, "input_arrays"),
    ({"model": "tiny", "input_arrays": ["not an array"]}, r"input_arrays\[0\]"),
    ({"model": "tiny"}, "input_arrays"),
    ({"model": "tiny", "input_arrays": [GOOD], "diameter": -3}, "diameter"),
    ({"model": "tiny", "input_arrays": [GOOD], "flow_threshold": "high"}, "flow_threshold"),
    ({"model": "tiny", "input_arrays": [GOOD], "niter": -1}, "niter"),
]


@pytest.mark.parametrize(("kwargs", "needle"), INFER_CASES)
async def test_bad_infer_calls(frank, kwargs, needle):
    _, svc = frank
    with pytest.raises(Exception, match=needle):
        await svc.infer(**kwargs)
    await _still_serving(svc)


ARTIFACT_INFER_CASES = [
    (["files/empty.tif"], "empty.tif.*empty"),
    (["files/corrupt.tif"], "corrupt.tif.*cannot read"),
    (["files/huge.tif"], "huge.tif.*limit"),
    (["../etc/passwd"], r"image_paths\[0\].*'\.\.'"),
    (["/etc/passwd"], r"image_paths\[0\].*absolute"),
    (["s3://bucket/x.tif"], r"image_paths\[0\].*URL"),
]


@pytest.mark.parametrize(("paths", "needle"), ARTIFACT_INFER_CASES)
async def test_bad_files_in_artifacts_are_named(frank, bad_dataset, paths, needle):
    _, svc = frank
    with pytest.raises(Exception, match=needle):
        await svc.infer(model="tiny", artifact=bad_dataset, image_paths=paths)
    await _still_serving(svc)


async def test_artifact_that_does_not_exist(frank):
    _, svc = frank
    with pytest.raises(Exception, match="not found"):
        await svc.infer(model="tiny", artifact="ws-user-frank/nothing-here", image_paths=["a.tif"])
    with pytest.raises(Exception, match="artifact"):
        await svc.infer(model="tiny", artifact="not an id", image_paths=["a.tif"])


async def test_artifact_of_someone_else_is_not_readable(frank, running_stack, dev_data):
    owner = await running_stack.connect("gina")
    try:
        private = await upload_folder(owner, dev_data / "images" / "test", alias="private")
    finally:
        await owner.disconnect()
    _, svc = frank
    with pytest.raises(Exception, match="not found"):
        await svc.infer(model="tiny", artifact=private, image_paths=["nuclei_03.tif"])


TRAIN_CASES = [
    ({"n_epochs": "ten"}, "n_epochs"),
    ({"n_epochs": 0}, "n_epochs"),
    ({"n_epochs": -5}, "n_epochs"),
    ({"n_epochs": 10**6}, "n_epochs"),
    ({"learning_rate": -1e-5}, "learning_rate"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"n_samples": 0}, "n_samples"),
    ({"validation_interval": 1}, "validation_interval"),
    ({"test_images": "images/good/"}, "test_annotations"),
    ({"train_images": "images/good/*.tif"}, "same form"),
    ({"train_images": "images/good"}, "ending in '/'"),
    ({"train_images": "/abs/images/"}, "train_images.*absolute"),
    ({"train_annotations": "../annotations/good/"}, "train_annotations"),
    ({"model": "nope"}, "model not found"),
    ({"artifact": "ws-user-frank/missing"}, "not found"),
    ({"unknown_option": 1}, "unknown_option"),
]


@pytest.mark.parametrize(("changes", "needle"), TRAIN_CASES)
async def test_bad_training_arguments(frank, bad_dataset, changes, needle):
    _, svc = frank
    args = {
        "artifact": bad_dataset,
        "train_images": "images/good/",
        "train_annotations": "annotations/good/",
        "model": "tiny",
        "n_epochs": 1,
    }
    args.update(changes)
    with pytest.raises(Exception, match=needle):
        await svc.start_training(**args)
    await _still_serving(svc)


SESSION_FAILURES = [
    ("images/float/", "annotations/float/", "x.tif.*non-integer"),
    ("images/neg/", "annotations/neg/", "x.tif.*negative"),
    ("images/size/", "annotations/size/", "x.tif.*differs from image shape"),
    ("images/none/", "annotations/none/", "min_train_masks"),
    ("images/good/", "annotations/size/", "a.tif"),
    ("images/good/*.png", "annotations/good/*.png", "matches no image files"),
]


@pytest.mark.parametrize(("images", "annotations", "needle"), SESSION_FAILURES)
async def test_bad_data_fails_the_session_naming_the_file(
    frank, bad_dataset, images, annotations, needle
):
    """Problems found while preparing or reading the data end the session as failed."""
    import re

    _, svc = frank
    started = await svc.start_training(
        artifact=bad_dataset,
        train_images=images,
        train_annotations=annotations,
        model="tiny",
        n_epochs=1,
    )
    status = await follow(svc, started["session_id"], interval=0.3, show_progress=False)
    assert status["status_type"] == "failed"
    assert re.search(needle, status["message"]), status["message"]
    await _still_serving(svc)
