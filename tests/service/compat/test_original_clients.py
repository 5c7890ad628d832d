"""The original service's own clients, replayed against ours on the real stack.

Each test follows one client's call sequence (its arguments, its reading of
the answers), written afresh from the original app's client script, status
checker and tutorial notebook: train and monitor formatting every key,
metrics table, export with description, cover download, inference with a
session id, continuing from an exported model, the sessions dict, deletion.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from cellpose_finetuning.client import upload_folder
from tests.service.compat import clients

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def dave(running_stack):
    server = await running_stack.connect("dave")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
async def colab_dataset(dave, dev_data, tmp_path_factory):
    """The notebook's dataset layout: train_images/*.png and masks_cells/*.png (palette)."""
    server, _ = dave
    root = tmp_path_factory.mktemp("colab")
    (root / "train_images").mkdir()
    (root / "masks_cells").mkdir()
    for path in sorted((dev_data / "images" / "train").glob("nuclei_*.tif")):
        img = tifffile.imread(path).astype("float32")
        rgb = np.repeat((img / img.max() * 255).astype("uint8")[..., None], 3, axis=-1)
        Image.fromarray(rgb).save(root / "train_images" / f"{path.stem}.png")
        labels = tifffile.imread(dev_data / "annotations" / "train" / path.name).astype("uint8")
        mask = Image.frombytes("P", labels.shape[::-1], labels.tobytes())
        mask.putpalette([v for i in range(256) for v in ((i * 67) % 256, (i * 131) % 256, i)])
        mask.save(root / "masks_cells" / f"{path.stem}.png")
    return await upload_folder(server, root, alias="colab-notebook-data")


async def poll(svc, session_id, line, done=("completed", "failed"), timeout=400):
    """A client's polling loop: format every status, stop at one of ``done``."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await svc.get_training_status(session_id)
        seen.append(line(status))
        if status["status_type"] in done:
            return status, seen
        await asyncio.sleep(0.3)
    raise TimeoutError(seen[-1])


async def test_client_script_sequence(dave, running_stack, dev_data, learned_model):
    """The original's client script: train, monitor, metrics file, export + cover, infer."""
    server, svc = dave
    dataset = await upload_folder(server, dev_data, alias="script-data")
    kwargs = {
        "artifact": dataset,
        "train_images": "images/train/",
        "train_annotations": "annotations/train/",
        "test_images": "images/test/",
        "test_annotations": "annotations/test/",
        "n_epochs": 2,
        "learning_rate": 1e-5,
        "n_samples": None,
        "min_train_masks": 5,
        "validation_interval": 1,
        "model": learned_model,
    }
    session_id = (await svc.start_training(**kwargs))["session_id"]
    status, lines = await poll(svc, session_id, clients.original_cli_monitor_line)
    assert status["status_type"] == "completed", status["message"]
    assert any("| Epoch: 2/2" in line and "| Val: " in line for line in lines)
    table = clients.original_metrics_table(session_id, status)
    assert len(table.splitlines()) == 3 and "N/A" not in table
    report = clients.original_check_status_report(session_id, status)
    assert "Epoch 2: train=" in report and ", test=" in report

    export = await svc.export_model(
        session_id=session_id,
        model_name=f"test-model-{session_id[:8]}",
        collection="bioimage-io/colab-annotations",
    )
    assert export["status"] == "exported"
    am = await server.get_service("public/artifact-manager")
    cover_url = await am.get_file(export["artifact_id"], "cover.png")
    async with httpx.AsyncClient() as http:
        resp = await http.get(cover_url)
        resp.raise_for_status()
    assert resp.content[:8] == b"\x89PNG\r\n\x1a\n"

    # --infer-numpy: a random array with the session id as the model
    arr = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype="uint8")
    result = await svc.infer(model=session_id, input_arrays=[arr], diameter=40.0)
    assert result[0]["input_path"] == "input_arrays[0]"
    assert result[0]["output"].shape == (64, 64)
    # --infer-image: artifact paths
    result = await svc.infer(
        artifact=dataset, image_paths=["images/test/nuclei_03.tif"], model=session_id
    )
    assert result[0]["input_path"] == "images/test/nuclei_03.tif"
    assert result[0]["output"].shape == (256, 256)


async def test_notebook_sequence(dave, colab_dataset, learned_model):
    """The tutorial: train on PNGs, infer, compare, export with a description, continue
    from the exported model, delete both sessions."""
    _, cellpose_service = dave
    initial_model = learned_model
    session_status = await cellpose_service.start_training(
        artifact=colab_dataset,
        train_images="train_images/*.png",
        train_annotations="masks_cells/*.png",
        model=initial_model,
        n_epochs=2,
        n_samples=None,
        min_train_masks=1,
    )
    session_id = session_status["session_id"]
    assert "start_time" not in session_status or isinstance(session_status["start_time"], str)
    status, lines = await poll(cellpose_service, session_id, clients.notebook_monitor_line)
    assert status["status_type"] == "completed", status["message"]
    assert any("| Train: 3 samples" in line for line in lines)
    valid = [x for x in status["train_losses"] if x > 0]
    assert len(valid) == 2

    img = np.zeros((280, 300, 3), "uint8")  # HWC, as PIL gives it
    img[40:80, 60:100] = 200
    test_img_chw = img[:256, :256].transpose(2, 0, 1)
    fine = await cellpose_service.infer(model=session_id, input_arrays=[test_img_chw], diameter=40)
    base = await cellpose_service.infer(
        model=initial_model, input_arrays=[test_img_chw], diameter=40
    )
    assert fine[0]["output"].shape == base[0]["output"].shape == (256, 256)

    ts = time.strftime("%Y%m%d-%H%M%S")
    export_result = await cellpose_service.export_model(
        session_id=session_id,
        model_name=f"cellpose-finetuned-tutorial-{ts}",
        description="Cellpose-SAM model fine-tuned on HPA demo dataset via the tutorial.",
    )
    exported_artifact_id = export_result["artifact_id"]
    assert export_result["artifact_url"].endswith(f"/artifacts/cellpose-finetuned-tutorial-{ts}")
    # exporting the unchanged session again gives the same export back
    again = await cellpose_service.export_model(session_id=session_id)
    assert again == export_result
    assert (await cellpose_service.get_training_status(session_id))["exported_artifact_id"] == (
        exported_artifact_id
    )

    continued = await cellpose_service.start_training(
        artifact=colab_dataset,
        train_images="train_images/*.png",
        train_annotations="masks_cells/*.png",
        model=exported_artifact_id,
        n_epochs=1,
        min_train_masks=1,
    )
    session_id_continued = continued["session_id"]
    status, _ = await poll(
        cellpose_service,
        session_id_continued,
        clients.notebook_monitor_line,
        done=("completed", "failed", "stopped"),
    )
    assert status["status_type"] == "completed", status["message"]
    assert status["model"] == exported_artifact_id

    delete_result = await cellpose_service.delete_training_session(session_id=session_id_continued)
    assert delete_result["deleted"] == session_id_continued
    delete_result_orig = await cellpose_service.delete_training_session(session_id=session_id)
    assert delete_result_orig["deleted"] == session_id


async def test_sessions_dict_filters_and_debug_info(dave, colab_dataset):
    _, svc = dave
    started = await svc.start_training(
        artifact=colab_dataset,
        train_images="train_images/*.png",
        train_annotations="masks_cells/*.png",
        model="tiny",
        n_epochs=1,
        n_samples=0.5,
        label="nuclei",
        enable_clahe=True,
        rescale=True,
    )
    sid = started["session_id"]
    status, _ = await poll(svc, sid, clients.seed_quick_start_line)
    assert status["status_type"] == "completed", status["message"]
    assert status["n_train"] == 2 and status["n_samples"] == 0.5  # round(0.5 * 3)
    assert status["label"] == "nuclei"
    sessions = await svc.list_training_sessions()
    assert isinstance(sessions, dict) and sessions[sid]["session_id"] == sid
    assert list(await svc.list_training_sessions(labels=["nuclei"])) == [sid]
    assert await svc.list_training_sessions(labels=["cells"]) == {}
    assert sid in await svc.list_training_sessions(
        status_types=["completed"], dataset_artifact_ids=[colab_dataset]
    )
    assert len(await svc.list_training_sessions(limit=1)) == 1
    info = await svc.debug_task_info(sid)
    assert info["session_id"] == sid and info["status_type"] == "completed"
    assert isinstance(info["task_exists"], bool) and isinstance(info["all_tasks"], list)
    restarted = await svc.restart_training(sid, n_epochs=1)
    assert restarted["restarted_from"] == sid and "last_continued_time" in restarted
    status, _ = await poll(svc, sid, clients.seed_quick_start_line)
    assert status["status_type"] == "completed" and len(status["train_losses"]) == 2


async def test_preflight_counts_pairs_without_training(dave, colab_dataset):
    _, svc = dave
    before = await svc.list_training_sessions()
    got = await svc.preflight_training_dataset(
        artifact=colab_dataset,
        train_images="train_images/*.png",
        train_annotations="masks_cells/*.png",
        n_samples=0.4,
        check_masks=True,
    )
    assert got["ok"] is True and got["train_pair_count"] == 3
    assert got["test_pair_count"] == 0 and got["n_samples_resolved"] == 1
    assert got["problems"] == []
    bad = await svc.preflight_training_dataset(
        artifact=colab_dataset, train_images="train_images/", train_annotations="nope/"
    )
    assert bad["ok"] is False and "nope/" in bad["message"]
    assert await svc.list_training_sessions() == before


async def test_json_safe_flows_and_clahe_inference(dave):
    _, svc = dave
    arr = np.zeros((64, 80), "uint16")
    arr[10:30, 20:40] = 900
    item = (await svc.infer(model="tiny", input_arrays=[arr], json_safe=True))[0]
    payload = item["output"]
    assert payload["encoding"] == "mask_png_base64"
    assert (payload["width"], payload["height"]) == (80, 64)
    import base64
    import io

    png = Image.open(io.BytesIO(base64.b64decode(payload["png_base64"])))
    assert png.mode == "RGBA" and png.size == (80, 64)
    labels = (await svc.infer(model="tiny", input_arrays=[arr]))[0]["output"]
    assert payload["object_count"] == len(np.unique(labels[labels > 0]))
    alpha = np.asarray(png)[..., 3]
    assert np.array_equal(alpha > 0, labels > 0)

    flows = (await svc.infer(model="tiny", input_arrays=[arr], return_flows=True))[0]
    assert flows["output"].shape == (64, 80)
    hsv, dp, cellprob = flows["flows"][:3]
    assert hsv.shape == (64, 80, 3) and dp.shape == (2, 64, 80) and cellprob.shape == (64, 80)
    only = (await svc.infer(model="tiny", input_arrays=[arr], return_flows_only=True))[0]
    assert set(only["output"]) == {"dP", "cellprob"}
    assert np.allclose(only["output"]["cellprob"], cellprob, atol=1e-4)
    clahe = (await svc.infer(model="tiny", input_arrays=[arr], enable_clahe=True))[0]
    assert clahe["output"].shape == (64, 80)
