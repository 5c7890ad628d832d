"""export_model and list_models_by_dataset on the real stack."""

from __future__ import annotations

import asyncio
import zipfile

import httpx
import pytest

from cellpose_finetuning.client import follow, upload_folder
from cellpose_finetuning.export.bioimageio import test_package, validate_package

pytestmark = pytest.mark.stack

# The tiny network trained for an epoch finds objects only at permissive thresholds.
LOOSE = {"flow_threshold": 0.0, "cellprob_threshold": -3.0}


@pytest.fixture(scope="module")
async def erin(running_stack):
    server = await running_stack.connect("erin")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
async def sessions(erin, dev_data):
    """One session on dataset A and one on dataset B."""
    server, svc = erin
    ds_a = await upload_folder(server, dev_data, alias="set-a")
    ds_b = await upload_folder(server, dev_data, alias="set-b")
    out = {}
    for name, ds in (("a", ds_a), ("b", ds_b)):
        started = await svc.start_training(
            artifact=ds,
            train_images="images/train/",
            train_annotations="annotations/train/",
            test_images="images/test/",
            test_annotations="annotations/test/",
            model="tiny",
            n_epochs=1,
        )
        out[name] = (ds, started["session_id"])
    for _, sid in out.values():
        status = await follow(svc, sid, interval=0.3, show_progress=False)
        assert status["status_type"] == "completed", status["message"]
    return out


@pytest.fixture(scope="module")
async def exported(erin, sessions):
    _, svc = erin
    return await svc.export_model(
        session_id=sessions["a"][1],
        model_name="erin-model-a1",
        collection="bioimage-io/colab-annotations",
        **LOOSE,
    )


async def test_export_returns_the_contract_keys(exported):
    assert set(exported) >= {
        "artifact_id",
        "model_name",
        "status",
        "artifact_url",
        "download_url",
        "files",
    }
    assert exported["status"] == "exported"
    assert exported["artifact_id"] == "bioimage-io/erin-model-a1"
    assert {
        "rdf.yaml",
        "model.py",
        "model_weights.pth",
        "input_sample.npy",
        "output_sample.npy",
        "cover.png",
        "doc.md",
    } <= set(exported["files"])


async def test_downloaded_zip_validates_and_passes_the_model_test(exported, tmp_path):
    async with httpx.AsyncClient(timeout=120, follow_redirects=True) as client:
        resp = await client.get(exported["download_url"])
    assert resp.status_code == 200
    path = tmp_path / "model.zip"
    path.write_bytes(resp.content)
    assert "rdf.yaml" in zipfile.ZipFile(path).namelist()
    assert validate_package(path) == []
    # One weight format here (the export tests run bioimageio.core's test on all three).
    report = await asyncio.to_thread(test_package, path, weight_format="onnx")
    assert report.passed, report.errors


async def test_models_are_found_by_dataset(erin, sessions, exported):
    _, svc = erin
    for sid, name in ((sessions["a"][1], "erin-model-a2"), (sessions["b"][1], "erin-model-b1")):
        await svc.export_model(session_id=sid, model_name=name, **LOOSE)
    by_a = await svc.list_models_by_dataset(dataset_id=sessions["a"][0])
    by_b = await svc.list_models_by_dataset(
        dataset_id=sessions["b"][0], collection="bioimage-io/colab-annotations"
    )
    assert {m["name"] for m in by_a} == {"erin-model-a1", "erin-model-a2"}
    assert [m["name"] for m in by_b] == ["erin-model-b1"]
    assert set(by_a[0]) == {"id", "name", "created_at", "url"}
    assert by_a[0]["created_at"] >= by_a[1]["created_at"]


async def test_duplicate_name_is_refused(erin, sessions, exported):
    _, svc = erin
    with pytest.raises(Exception, match="already exists"):
        await svc.export_model(session_id=sessions["a"][1], model_name="erin-model-a1", **LOOSE)


async def test_a_model_that_finds_nothing_is_refused_and_nothing_is_published(erin, sessions):
    _, svc = erin
    with pytest.raises(Exception, match="finds no objects.*cellprob_threshold"):
        await svc.export_model(
            session_id=sessions["a"][1], model_name="erin-empty", cellprob_threshold=6.0
        )
    listed = await svc.list_models_by_dataset(dataset_id=sessions["a"][0])
    assert "erin-empty" not in {m["name"] for m in listed}


async def test_unknown_collection_is_named(erin, sessions):
    _, svc = erin
    with pytest.raises(Exception, match="not found"):
        await svc.export_model(
            session_id=sessions["a"][1],
            model_name="x-model",
            collection="bioimage-io/no-such-collection",
            **LOOSE,
        )


async def test_another_user_cannot_export_your_session(running_stack, sessions):
    server = await running_stack.connect("mallory")
    try:
        svc = await server.get_service(running_stack.service_id)
        with pytest.raises(Exception, match="not found"):
            await svc.export_model(session_id=sessions["a"][1], model_name="stolen-model")
    finally:
        await server.disconnect()


async def test_cli_export_publishes_a_local_session(
    running_stack, tiny_model, train_pairs, test_pairs, tmp_path
):
    """export --publish: built and validated locally, uploaded with the user's own token."""
    import json

    from click.testing import CliRunner

    from cellpose_finetuning.cli import main
    from cellpose_finetuning.engine.runs import create_local_session
    from cellpose_finetuning.engine.training import run_training

    session = create_local_session(
        out=tmp_path / "local",
        train_pairs=train_pairs,
        test_pairs=test_pairs,
        settings={"model": str(tiny_model), "n_epochs": 1},
    )
    await asyncio.to_thread(run_training, session)
    args = [
        "export",
        str(session.path),
        "--out",
        str(tmp_path / "pkg.zip"),
        "--flow-threshold",
        "0",
        "--cellprob-threshold",
        "-3",
        "--publish",
        "bioimage-io/colab-annotations",
        "--alias",
        "local-published",
        "--server-url",
        running_stack.server_url,
        "--token",
        running_stack.token("erin"),
    ]
    result = await asyncio.to_thread(CliRunner().invoke, main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["published"]["artifact_id"] == "bioimage-io/local-published"
    async with httpx.AsyncClient(timeout=120, follow_redirects=True) as client:
        resp = await client.get(report["published"]["download_url"])
    path = tmp_path / "downloaded.zip"
    path.write_bytes(resp.content)
    assert validate_package(path) == []
