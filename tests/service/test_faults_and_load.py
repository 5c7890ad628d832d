"""Faults and load on the running service: a killed worker, many users at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import numpy as np
import psutil
import pytest
import tifffile

from cellpose_finetuning.client import follow, upload_folder
from tests.helpers import follow_status

pytestmark = pytest.mark.stack


async def _wait_epoch(svc, sid: str, epoch: int) -> None:
    await follow_status(
        svc, sid, done=lambda st: (st.get("current_epoch") or 0) >= epoch, interval=0.2
    )


async def test_killed_worker_fails_the_session_which_continues_and_the_service_serves_on(
    running_stack, dev_data
):
    server = await running_stack.connect("hank")
    try:
        svc = await server.get_service(running_stack.service_id)
        ds = await upload_folder(server, dev_data, alias="kill-data")
        started = await svc.start_training(
            artifact=ds,
            train_images="images/train/",
            train_annotations="annotations/train/",
            model="tiny",
            n_epochs=400,
        )
        sid = started["session_id"]
        await _wait_epoch(svc, sid, 1)
        status_file = running_stack.data_dir / "sessions" / sid / "status.json"
        pid = json.loads(status_file.read_text())["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        status = await follow(svc, sid, interval=0.2, show_progress=False)
        assert status["status_type"] == "failed" and "ended unexpectedly" in status["message"]
        assert "worker_pid" not in status  # internals stay internal
        done = len(status["train_losses"])
        await svc.restart_training(sid, n_epochs=1)
        final = await follow(svc, sid, interval=0.3, show_progress=False)
        assert final["status_type"] == "completed"
        assert len(final["train_losses"]) == done + 1
    finally:
        await server.disconnect()


@pytest.mark.slow
async def test_50_concurrent_infer_calls_from_5_users_during_training(running_stack, dev_data):
    """All answered correctly, memory bounded, and the training still finishes."""
    from cellpose_finetuning.engine.inference import ModelCache, ModelRef, segment

    image = tifffile.imread(dev_data / "images/test/nuclei_03.tif")
    tiny = running_stack.data_dir / "models" / "tiny.pth"
    expected = segment(
        ModelCache().get(ModelRef("tiny", str(tiny), "checkpoint")),
        image[None].astype("float32"),
        name="reference",
    )
    trainer = await running_stack.connect("ivan")
    users = [await running_stack.connect(f"load-{i}") for i in range(5)]
    proc = psutil.Process()
    try:
        tsvc = await trainer.get_service(running_stack.service_id)
        ds = await upload_folder(trainer, dev_data, alias="load-data")
        started = await tsvc.start_training(
            artifact=ds,
            train_images="images/train/",
            train_annotations="annotations/train/",
            model="tiny",
            n_epochs=3,
        )
        services = [await u.get_service(running_stack.service_id) for u in users]
        rss_before = proc.memory_info().rss

        async def call(i: int):
            return await services[i % 5].infer(model="tiny", input_arrays=[image])

        results = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(50))), 600)
        rss_growth = proc.memory_info().rss - rss_before
        assert all(np.array_equal(r[0]["output"], expected) for r in results)
        assert rss_growth < 1.5 * 2**30, f"service memory grew by {rss_growth / 2**20:.0f} MiB"
        status = await follow(tsvc, started["session_id"], interval=0.3, show_progress=False)
        assert status["status_type"] == "completed"
    finally:
        for conn in (trainer, *users):
            await conn.disconnect()
