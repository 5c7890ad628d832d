"""The original's arguments we did not take before: metadata_dir, fractional n_samples,
a published model as ``model``; good input works and bad input is named, service up."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from cellpose_finetuning.client import upload_folder

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def frank(running_stack):
    server = await running_stack.connect("frida")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
async def meta_dataset(frank, dev_data, tmp_path_factory):
    """The dev data plus metadata JSON files in the original's format (and a broken one)."""
    server, _ = frank
    root = tmp_path_factory.mktemp("meta")
    shutil.copytree(dev_data / "images", root / "images")
    shutil.copytree(dev_data / "annotations", root / "annotations")
    records = [
        {"image_path": f"images/train/{p.name}", "mask_path": f"annotations/train/{p.name}"}
        for p in sorted((dev_data / "images" / "train").glob("*.tif"))
    ] + [
        {
            "image": f"/images/test/{p.name}",
            "annotation": f"/annotations/test/{p.name}",
            "split": "test",
        }
        for p in sorted((dev_data / "images" / "test").glob("*.tif"))
    ]
    (root / "metadata").mkdir()
    (root / "metadata" / "pairs.json").write_text(json.dumps({"records": records}))
    (root / "badmeta").mkdir()
    (root / "badmeta" / "broken.json").write_text('{"records": [')
    return await upload_folder(server, root, alias="meta-data")


async def _wait(svc, sid, timeout=400):
    for _ in range(int(timeout / 0.3)):
        st = await svc.get_training_status(sid)
        if st["status_type"] in ("completed", "failed", "stopped"):
            return st
        await asyncio.sleep(0.3)
    raise TimeoutError(sid)


async def test_metadata_dir_pairs_train_and_test(frank, meta_dataset):
    _, svc = frank
    pre = await svc.preflight_training_dataset(artifact=meta_dataset, metadata_dir="metadata/")
    assert pre["ok"] and (pre["train_pair_count"], pre["test_pair_count"]) == (5, 2)
    started = await svc.start_training(
        artifact=meta_dataset,
        train_images=None,
        train_annotations=None,
        metadata_dir="metadata",
        model="tiny",
        n_epochs=1,
        learning_rate=1e-3,
    )
    st = await _wait(svc, started["session_id"])
    assert st["status_type"] == "completed", st["message"]
    assert (st["n_train"], st["n_test"]) == (5, 2) and "instance_metrics" in st


async def test_bad_metadata_dir_is_named(frank, meta_dataset):
    _, svc = frank
    missing = await svc.preflight_training_dataset(artifact=meta_dataset, metadata_dir="nope/")
    assert missing["ok"] is False and "metadata_dir" in missing["message"]
    broken = await svc.preflight_training_dataset(artifact=meta_dataset, metadata_dir="badmeta/")
    assert broken["ok"] is False
    assert "badmeta/broken.json" in broken["message"] and "JSON" in broken["message"]
    started = await svc.start_training(
        artifact=meta_dataset, metadata_dir="badmeta/", model="tiny", n_epochs=1
    )
    st = await _wait(svc, started["session_id"])
    assert st["status_type"] == "failed" and "badmeta/broken.json" in st["message"]
    assert "tiny" in await svc.list_pretrained_models()  # still serving


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n_samples": 1.5}, "n_samples"),
        ({"n_samples": -0.5}, "n_samples"),
        ({"train_images": None}, "train_images"),
        ({"metadata_dir": ""}, "metadata_dir"),
        ({"label": ["x"]}, "label"),
        ({"model": "ws-user-frida/meta-data"}, "model"),  # a dataset, not a model
        ({"model": "ws-user-nobody/some-model"}, "model"),  # missing or not yours
    ],
)
async def test_bad_new_arguments_are_named(frank, meta_dataset, kwargs, named):
    _, svc = frank
    args = dict(
        artifact=meta_dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        model="tiny",
        n_epochs=1,
    )
    args.update(kwargs)
    before = await svc.list_training_sessions()
    with pytest.raises(Exception, match=named):
        await svc.start_training(**args)
    assert await svc.list_training_sessions() == before


async def test_bad_export_and_infer_arguments_are_named(frank):
    _, svc = frank
    import numpy as np

    arr = np.zeros((32, 32), "uint8")
    with pytest.raises(Exception, match="model"):
        await svc.infer(model="ws-user-nobody/some-model", input_arrays=[arr])
    with pytest.raises(Exception, match="session"):
        await svc.export_model(session_id="no-such-session", authors=[{"name": ""}])
    with pytest.raises(Exception, match="limit"):
        await svc.list_training_sessions(limit=0)
    with pytest.raises(Exception, match="status_types"):
        await svc.list_training_sessions(status_types=["finished"])
