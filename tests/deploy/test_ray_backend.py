"""The service on the Ray backend: a local Ray (2 CPUs), two inference replicas, the tiny model.

The service is the same object as on the embedded stack; it registers on the
session's real Hypha stack (``server_url`` mode) with Ray executors behind it.
One end-to-end check (the contract's Quick Start, 20 concurrent calls) runs
in the default suite; killing replicas and training tasks is ``slow``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal

import numpy as np
import pytest

from cellpose_finetuning.client import upload_folder
from cellpose_finetuning.deploy.ray_backend import RayOptions, replica_actors
from cellpose_finetuning.engine.inference import ModelRef
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.io.images import read_image
from cellpose_finetuning.scheduler import LocalInference
from tests.helpers import follow_status

pytestmark = pytest.mark.stack

WORKSPACE = "ray-backend"


@pytest.fixture(scope="module")
async def ray_service(hypha_stack, tiny_model, tmp_path_factory):
    """``serve --backend ray`` against the session's stack; yields (data_dir, service)."""
    from cellpose_finetuning.deploy.serve import ServeOptions, serve

    data_dir = tmp_path_factory.mktemp("ray-service")
    (data_dir / "models").mkdir()
    shutil.copy(tiny_model, data_dir / "models" / "tiny.pth")
    options = ServeOptions(
        data_dir=data_dir,
        server_url=hypha_stack.server_url,
        token=hypha_stack.service_token(),
        workspace=WORKSPACE,
        service_config={"worker_threads": 1},
        backend="ray",
        ray=RayOptions(
            num_cpus=2,
            inference_replicas=2,
            replica_cpus=0.5,
            training_cpus=1,
            torch_threads=1,
        ),
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(options, ready, stop))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=240, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert waiter in done, "serve --backend ray did not come up in 240 s"
    yield data_dir
    stop.set()
    await asyncio.wait_for(task, 120)


async def _client(stack, user: str | None):
    from hypha_rpc import connect_to_server

    config = {"server_url": stack.server_url}
    if user:
        config["token"] = stack.token(user)
    server = await connect_to_server(config)
    return server, await server.get_service(f"{WORKSPACE}/cellpose-finetuning")


@pytest.fixture(scope="module")
async def carol(hypha_stack, ray_service):
    server, svc = await _client(hypha_stack, "carol")
    yield server, svc
    await server.disconnect()


@pytest.fixture(scope="module")
def test_image(test_pairs) -> np.ndarray:
    return read_image(test_pairs[0][0])


async def _engine_masks(data_dir, image) -> np.ndarray:
    """The engine's answer in this process: what every Ray call must equal."""
    ref = ModelRef("tiny", str(data_dir / "models" / "tiny.pth"), "checkpoint")
    engine = LocalInference(device="cpu")
    return (await engine.segment(ref, [image], ["image"], InferenceSettings()))[0]


async def test_quick_start_runs_unchanged_on_the_ray_backend(carol, dev_data, ray_service):
    """The contract's Quick Start: infer on arrays, train, poll, infer with the session."""
    server, cellpose_service = carol
    img_array = np.random.default_rng(0).integers(0, 255, (3, 96, 128), dtype="uint8")
    result = await cellpose_service.infer(
        model="tiny",
        input_arrays=[img_array],
        diameter=None,
        flow_threshold=0.4,
        cellprob_threshold=0,
        niter=250,
    )
    assert result[0]["output"].shape == (96, 128)

    dataset = await upload_folder(server, dev_data, alias="ray-dev-data")
    session_status = await cellpose_service.start_training(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        test_images="images/test/",
        test_annotations="annotations/test/",
        model="tiny",
        n_epochs=2,
        validation_interval=1,
        learning_rate=1e-3,
    )
    session_id = session_status["session_id"]
    status, history = await follow_status(cellpose_service, session_id)
    messages = {st["message"] for st in history}
    assert status["status_type"] == "completed", status["message"]
    assert len(status["train_losses"]) == 2 and len(status["test_metrics"]) == 2
    assert status["instance_metrics"]["n_true"] > 0
    # It went through the Ray task, not a local worker process.
    assert any("Ray" in m for m in messages), messages

    result = await cellpose_service.infer(model=session_id, input_arrays=[img_array])
    assert result[0]["output"].shape == (96, 128)


async def test_twenty_concurrent_calls_on_two_replicas_match_the_engine(
    carol, ray_service, test_image
):
    _, svc = carol
    expected = await _engine_masks(ray_service, test_image)
    results = await asyncio.gather(
        *[svc.infer(model="tiny", input_arrays=[test_image]) for _ in range(20)]
    )
    assert len(results) == 20
    for result in results:
        np.testing.assert_array_equal(result[0]["output"], expected)
    assert len(replica_actors()) == 2


async def test_bad_input_through_ray_is_named_and_the_service_stays_up(carol, test_image):
    _, svc = carol
    with pytest.raises(Exception, match=r"input_arrays\[0\]"):
        await svc.infer(model="tiny", input_arrays=[np.zeros((2, 3, 4, 5, 6), "float32")])
    with pytest.raises(Exception, match="model not found"):
        await svc.infer(model="nope", input_arrays=[test_image])
    result = await svc.infer(model="tiny", input_arrays=[test_image])
    assert result[0]["output"].shape == test_image.shape[-2:]


@pytest.mark.slow
async def test_a_replica_killed_mid_call_is_retried_on_the_other(carol, ray_service, test_image):
    import ray

    _, svc = carol
    image = np.tile(test_image, (1, 3, 3))  # ~0.8 MP: calls take long enough to kill mid-way
    expected = await _engine_masks(ray_service, image)
    calls = [asyncio.ensure_future(svc.infer(model="tiny", input_arrays=[image])) for _ in range(8)]
    await asyncio.sleep(1.0)  # let both replicas take calls (no event to wait on here)
    victim = replica_actors()[0]
    in_flight = sum(not c.done() for c in calls)
    ray.kill(victim, no_restart=False)
    # Calls were still queued on both replicas: the victim's had to go elsewhere.
    assert in_flight >= 4, in_flight
    results = await asyncio.gather(*calls)
    for result in results:
        np.testing.assert_array_equal(result[0]["output"], expected)
    # Serve replaces the killed replica; the service keeps answering.
    result = await svc.infer(model="tiny", input_arrays=[image])
    np.testing.assert_array_equal(result[0]["output"], expected)


@pytest.mark.slow
async def test_a_training_task_killed_mid_run_fails_clearly_and_continues(
    carol, dev_data, ray_service
):
    server, svc = carol
    dataset = await upload_folder(server, dev_data, alias="ray-kill-data")
    status = await svc.start_training(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        model="tiny",
        n_epochs=40,
        learning_rate=1e-3,
    )
    session_id = status["session_id"]
    status, _ = await follow_status(  # until an epoch is done, so a checkpoint exists
        svc,
        session_id,
        lambda st: st["train_losses"] or st["status_type"] in ("completed", "failed"),
        0.3,
    )
    assert status["status_type"] == "running", status["message"]
    recorded = json.loads((ray_service / "sessions" / session_id / "status.json").read_text())
    os.kill(recorded["worker_pid"], signal.SIGKILL)  # the Ray worker process of the task
    status, _ = await follow_status(svc, session_id, lambda st: st["status_type"] != "running")
    assert status["status_type"] == "failed"
    assert "ended unexpectedly" in status["message"]
    done = len(status["train_losses"])
    assert done >= 1
    await svc.restart_training(session_id=session_id, n_epochs=1)
    status, _ = await follow_status(svc, session_id)
    assert status["status_type"] == "completed", status["message"]
    assert len(status["train_losses"]) >= done + 1


async def test_blockwise_job_runs_in_a_replica_and_gives_the_engines_labels(
    carol, ray_service, dev_data, tmp_path
):
    """infer on a slide in an artifact with block_size: a job whose blocks a replica runs."""
    import io
    import time

    import httpx
    import tifffile

    from cellpose_finetuning.engine.blockwise import segment_blockwise
    from cellpose_finetuning.engine.inference import ModelCache

    server, svc = carol
    img = tifffile.imread(dev_data / "images" / "test" / "nuclei_03.tif").astype("float32")
    quad = np.block([[img, img[:, ::-1]], [img[::-1, :], img[::-1, ::-1]]])[:384, :384]
    (tmp_path / "slide").mkdir()
    tifffile.imwrite(tmp_path / "slide" / "slide.tif", (quad / quad.max() * 60000).astype("uint16"))
    dataset = await upload_folder(server, tmp_path / "slide", alias="ray-slide")
    settings = {"block_size": 128, "cellprob_threshold": -3.0}
    (item,) = await svc.infer(model="tiny", artifact=dataset, image_paths=["slide.tif"], **settings)
    deadline = time.monotonic() + 300
    while (status := await svc.get_inference_status(item["job_id"]))["status"] not in (
        "completed",
        "failed",
    ):
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.2)
    assert status["status"] == "completed", status
    assert status["blocks_done"] == status["blocks_total"] == 2 * 9  # two passes
    model = ModelCache().get(
        ModelRef("tiny", str(ray_service / "models" / "tiny.pth"), "checkpoint")
    )
    expected = segment_blockwise(
        model, tmp_path / "slide" / "slide.tif", InferenceSettings(**settings), block_size=128
    ).masks
    async with httpx.AsyncClient() as client:
        resp = await client.get(status["download_url"])
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(resp.content)), expected)
    assert status["n_objects"] == int(expected.max())
