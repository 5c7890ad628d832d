"""The real embedded stack (SeaweedFS + Hypha + our service), once per test session."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from cellpose_finetuning.deploy.stack import EmbeddedStack, StackConfig
from tests.helpers import free_ports


@dataclass
class RunningStack:
    server_url: str
    service_id: str
    data_dir: Path
    stack: EmbeddedStack

    def token(self, user: str) -> str:
        return self.stack.token(user)

    async def connect(self, user: str | None):
        from hypha_rpc import connect_to_server

        config = {"server_url": self.server_url}
        if user:
            config["token"] = self.token(user)
        return await connect_to_server(config)


@pytest.fixture(scope="session")
def stack_config(tmp_path_factory) -> StackConfig:
    ports = free_ports(5)
    return StackConfig(
        data_dir=tmp_path_factory.mktemp("stack"),
        hypha_port=ports[0],
        s3_port=ports[1],
        weed_master_port=ports[2],
        weed_volume_port=ports[3],
        weed_filer_port=ports[4],
    )


@pytest.fixture(scope="session")
async def running_stack(stack_config, tiny_model, learned_tiny):
    """The stack serving ``tiny`` (untrained) and ``tiny-nuclei`` (the demo's trained network).

    ``learned_tiny`` is made before the service starts: the demo trains in this
    event loop's thread, which a running service must not share.
    """
    from cellpose_finetuning.deploy.serve import ServeOptions, read_connection_file, serve

    (stack_config.data_dir / "models").mkdir(parents=True)
    shutil.copy(tiny_model, stack_config.data_dir / "models" / "tiny.pth")
    shutil.copy(learned_tiny, stack_config.data_dir / "models" / "tiny-nuclei.pth")
    ready, stop = asyncio.Event(), asyncio.Event()
    options = ServeOptions(
        data_dir=stack_config.data_dir,
        stack=stack_config,
        user="alice",
        service_config={"worker_threads": 1, "max_active_sessions_per_user": 3},
    )
    task = asyncio.create_task(serve(options, ready, stop))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=180, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the startup error
    assert waiter in done, "the stack did not come up in 180 s"
    conn = read_connection_file(stack_config.data_dir)
    yield RunningStack(
        conn["server_url"], conn["service_id"], stack_config.data_dir, EmbeddedStack(stack_config)
    )
    stop.set()
    await asyncio.wait_for(task, 120)
