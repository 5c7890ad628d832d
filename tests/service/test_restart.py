"""Sessions survive a restart of the whole service and stack on the same data directory."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from cellpose_finetuning.client import follow, upload_folder
from cellpose_finetuning.deploy.serve import ServeOptions, read_connection_file, serve
from tests.service.conftest import free_ports

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


async def test_completed_session_and_dataset_survive_a_restart(tmp_path, tiny_model, dev_data):
    from hypha_rpc import connect_to_server

    from cellpose_finetuning.deploy.stack import EmbeddedStack, StackConfig

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
    token = None

    task, stop, conn = await _start(config, tiny_model)
    try:
        token = conn["token"]
        server = await connect_to_server({"server_url": conn["server_url"], "token": token})
        svc = await server.get_service(conn["service_id"])
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
        server = await connect_to_server({"server_url": conn["server_url"], "token": token})
        svc = await server.get_service(conn["service_id"])
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
