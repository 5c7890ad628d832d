"""Sessions survive a restart of the whole service and stack on the same data directory."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from cellpose_finetuning.client import follow, upload_folder
from cellpose_finetuning.deploy.serve import ServeOptions, read_connection_file, serve
from tests.helpers import follow_status, free_ports

pytestmark = pytest.mark.stack


async def _start(config, tiny_model):
    ready, stop = asyncio.Event(), asyncio.Event()
    options = ServeOptions(
        data_dir=config.data_dir, stack=config, user="carol", service_config={"worker_threads": 1}
    )
    task = asyncio.create_task(serve(options, ready, stop))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=180, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    return task, stop, read_connection_file(config.data_dir)


def _fresh_config(tmp_path, tiny_model):
    """A stack configuration on free ports, in its own folder, offering the tiny model."""
    from cellpose_finetuning.deploy.stack import StackConfig

    ports = free_ports(5)
    config = StackConfig(
        data_dir=tmp_path / "stack",
        hypha_port=ports[0],
        s3_port=ports[1],
        weed_master_port=ports[2],
        weed_volume_port=ports[3],
        weed_filer_port=ports[4],
    )
    (config.data_dir / "models").mkdir(parents=True)
    shutil.copy(tiny_model, config.data_dir / "models" / "tiny.pth")
    return config


async def _service(conn, token=None):
    """Connect with the stack's printed token (or ``token``) and get the service."""
    from hypha_rpc import connect_to_server

    server = await connect_to_server(
        {"server_url": conn["server_url"], "token": token or conn["token"]}
    )
    return server, await server.get_service(conn["service_id"])


async def test_completed_session_and_dataset_survive_a_restart(tmp_path, tiny_model, dev_data):

    from cellpose_finetuning.deploy.stack import EmbeddedStack, StackConfig

    config = _fresh_config(tmp_path, tiny_model)
    token = None

    task, stop, conn = await _start(config, tiny_model)
    try:
        token = conn["token"]
        server, svc = await _service(conn, token)
        dataset = await upload_folder(server, dev_data / "images" / "test", alias="keep-me")
        started = await svc.start_training(
            artifact=await upload_folder(server, dev_data, alias="dev"),
            train_images="images/train/",
            train_annotations="annotations/train/",
            model="tiny",
            n_epochs=1,
        )
        before = await follow(svc, started["session_id"], interval=0.3, show_progress=False)
        assert before["status_type"] == "completed"
        await server.disconnect()
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)

    task, stop, conn = await _start(config, tiny_model)
    try:
        token = EmbeddedStack(StackConfig(data_dir=config.data_dir)).token("carol")
        server, svc = await _service(conn, token)
        after = await svc.get_training_status(started["session_id"])
        assert after["status_type"] == "completed"
        assert after["train_losses"] == before["train_losses"]
        result = await svc.infer(
            model=started["session_id"], artifact=dataset, image_paths=["nuclei_03.tif"]
        )
        assert result[0]["output"].shape == (256, 256)
        await server.disconnect()
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)


@pytest.mark.slow
async def test_restart_during_a_training_run_loses_nothing(tmp_path, tiny_model, dev_data):
    """Stopping the service mid-run leaves a stopped (or failed) session that continues."""

    config = _fresh_config(tmp_path, tiny_model)

    task, stop, conn = await _start(config, tiny_model)
    try:
        server, svc = await _service(conn)
        ds = await upload_folder(server, dev_data, alias="dev")
        done = await svc.start_training(
            artifact=ds,
            train_images="images/train/",
            train_annotations="annotations/train/",
            model="tiny",
            n_epochs=1,
        )
        done_status = await follow(svc, done["session_id"], interval=0.3, show_progress=False)
        running = await svc.start_training(
            artifact=ds,
            train_images="images/train/",
            train_annotations="annotations/train/",
            model="tiny",
            n_epochs=500,
        )
        sid = running["session_id"]
        await follow_status(svc, sid, done=lambda st: (st.get("current_epoch") or 0) >= 1)
        await server.disconnect()
    finally:
        stop.set()
        await asyncio.wait_for(task, 180)

    task, stop, conn = await _start(config, tiny_model)
    try:
        server, svc = await _service(conn)
        assert await svc.get_training_status(done["session_id"]) == {
            **done_status,
            "updated_at": (await svc.get_training_status(done["session_id"]))["updated_at"],
        }
        interrupted = await svc.get_training_status(sid)
        assert interrupted["status_type"] in ("stopped", "failed")
        epochs = len(interrupted["train_losses"])
        assert epochs >= 1
        await svc.restart_training(sid, n_epochs=1)
        final = await follow(svc, sid, interval=0.3, show_progress=False)
        assert final["status_type"] == "completed"
        assert len(final["train_losses"]) == epochs + 1
        await server.disconnect()
    finally:
        stop.set()
        await asyncio.wait_for(task, 180)


@pytest.mark.slow
async def test_s3_down_while_loading_fails_the_session_clearly(tmp_path, tiny_model, dev_data):
    """With SeaweedFS gone, a new session fails with a message; nothing is left running."""
    import os
    import signal

    config = _fresh_config(tmp_path, tiny_model)
    task, stop, conn = await _start(config, tiny_model)
    try:
        server, svc = await _service(conn)
        ds = await upload_folder(server, dev_data, alias="dev")
        weed = [
            p
            for p in __import__("psutil").process_iter(["cmdline"])
            if p.info["cmdline"]
            and "weed" in p.info["cmdline"][0]
            and str(config.data_dir) in " ".join(p.info["cmdline"])
        ]
        assert len(weed) == 1
        os.killpg(weed[0].pid, signal.SIGKILL)
        weed[0].wait(10)
        try:
            started = await svc.start_training(
                artifact=ds,
                train_images="images/train/",
                train_annotations="annotations/train/",
                model="tiny",
                n_epochs=1,
            )
        except Exception as exc:  # refused up front: also a clear failure
            assert "artifact" in str(exc).lower() or "internal error" in str(exc)
        else:
            status = await follow(svc, started["session_id"], interval=0.3, show_progress=False)
            assert status["status_type"] == "failed"
            assert status["message"].startswith("Preparing the data failed")
        for session in (await svc.list_training_sessions()).values():
            assert session["status_type"] not in ("preparing", "running")
        assert "tiny" in await svc.list_pretrained_models()  # the service still answers
        await server.disconnect()
    finally:
        stop.set()
        await asyncio.wait_for(task, 180)
