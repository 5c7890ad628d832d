"""The embedded stack: real SeaweedFS and Hypha processes, no mocks."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest
from jose import jwt

from cellpose_finetuning.deploy.stack import (
    EmbeddedStack,
    StackConfig,
    StackError,
    mint_token,
    provision,
    read_connection_file,
)
from cellpose_finetuning.deploy.stack.connection import CONNECTION_KEYS
from cellpose_finetuning.deploy.testing import free_ports, test_stack_config
from cellpose_finetuning.errors import InvalidInput

pytestmark = pytest.mark.stack


def _processes_on(data_dir: Path) -> list[psutil.Process]:
    """Running processes whose command line names ``data_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(data_dir) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not yet reaped has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _connect(stack: EmbeddedStack, user: str | None):
    from hypha_rpc import connect_to_server

    config = {"server_url": stack.server_url}
    if user:
        config["token"] = stack.token(user)
    return await connect_to_server(config)


# --------------------------------------------------------------------------- no processes
def test_busy_port_is_named_and_nothing_starts(tmp_path):
    config = test_stack_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", config.s3_port))
        busy.listen()
        stack = EmbeddedStack(config)
        with pytest.raises(StackError, match=f"port {config.s3_port} .*--s3-port"):
            stack.start()
    assert stack.pids == {}
    assert not (tmp_path / "logs").exists()
    assert not _processes_on(tmp_path)


def test_busy_grpc_port_is_named_with_the_option_that_moves_it(tmp_path):
    config = test_stack_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", config.weed_filer_port + 10000))
        busy.listen()
        with pytest.raises(StackError, match=r"gRPC .*--weed-filer-port"):
            EmbeddedStack(config).start()
    assert not _processes_on(tmp_path)


def test_ports_must_all_differ(tmp_path):
    port = free_ports(1)[0]
    with pytest.raises(InvalidInput, match="--s3-port"):
        StackConfig(data_dir=tmp_path, hypha_port=port, s3_port=port)
    with pytest.raises(InvalidInput, match="--weed-filer-port"):
        StackConfig(data_dir=tmp_path, weed_filer_port=60000)  # its gRPC would be 70000


def test_tokens_name_the_users_workspace():
    claims = jwt.get_unverified_claims(mint_token("bob", secret="s3cret", expires_in=60))
    assert claims["sub"] == "bob"
    assert claims["scope"] == "ws:ws-user-bob#a wid:ws-user-bob"
    assert claims["exp"] - claims["iat"] == 60
    with pytest.raises(InvalidInput, match="user_id"):
        mint_token("bob/../eve", secret="s3cret")


def test_secret_is_created_once_private_and_reused(tmp_path):
    first = EmbeddedStack(StackConfig(data_dir=tmp_path)).secrets
    again = EmbeddedStack(StackConfig(data_dir=tmp_path)).secrets
    assert first == again
    assert (tmp_path / "secret.json").stat().st_mode & 0o077 == 0
    token = EmbeddedStack(StackConfig(data_dir=tmp_path)).token("carol")
    assert jwt.decode(token, first["jwt_secret"], audience=jwt.get_unverified_claims(token)["aud"])


def test_a_server_dying_during_startup_is_reported_with_its_log(tmp_path):
    stack = EmbeddedStack(test_stack_config(tmp_path, weed_extra_args=("-no-such-flag",)))
    with pytest.raises(StackError, match="weed exited during startup") as err:
        stack.start()
    message = str(err.value)
    assert "weed.log" in message and len(message.splitlines()) > 10  # its log's last lines
    assert stack.pids == {}
    assert not _processes_on(tmp_path)
    with pytest.raises(StackError, match="weed exited during startup"):
        stack.start()  # the failed start left no lock behind


# --------------------------------------------------------------------------- shared stack
def test_a_second_stack_on_the_same_data_dir_is_refused(hypha_stack):
    other = EmbeddedStack(test_stack_config(hypha_stack.data_dir))
    with pytest.raises(StackError, match="another stack is running"):
        other.start()
    other.stop()  # must not touch the running stack's files
    assert hypha_stack.running
    assert (hypha_stack.data_dir / "stack.pids").is_file()


async def test_a_token_for_bob_lands_in_ws_user_bob(hypha_stack):
    bob = await _connect(hypha_stack, "bob")
    try:
        assert bob.config.workspace == "ws-user-bob"
    finally:
        await bob.disconnect()


async def test_the_service_token_lands_in_the_service_workspace(hypha_stack):
    from hypha_rpc import connect_to_server

    service = await connect_to_server(
        {"server_url": hypha_stack.server_url, "token": hypha_stack.service_token()}
    )
    try:
        assert service.config.workspace == hypha_stack.workspace == "bioimage-io"
    finally:
        await service.disconnect()


async def test_the_model_collection_is_public_and_open_to_logged_in_users(hypha_stack):
    anonymous = await _connect(hypha_stack, None)
    bob = await _connect(hypha_stack, "bob")
    try:
        am = await anonymous.get_service("public/artifact-manager")
        collection = await am.read(hypha_stack.collection_id)
        assert collection["type"] == "collection"
        assert collection["config"]["permissions"]["*"] == "r"
        assert collection["config"]["permissions"]["@"] == "r+"
        with pytest.raises(Exception, match="(?i)permission"):
            await am.create(parent_id=collection["id"], alias="anon-model", type="model")
        bobs_am = await bob.get_service("public/artifact-manager")
        child = await bobs_am.create(
            parent_id=collection["id"], alias="bobs-model", type="model", manifest={"name": "b"}
        )
        assert child["workspace"] == "bioimage-io"
    finally:
        await anonymous.disconnect()
        await bob.disconnect()


def test_secrets_are_not_on_any_command_line(hypha_stack):
    secrets = hypha_stack.secrets
    for pid in hypha_stack.pids.values():
        cmdline = " ".join(psutil.Process(pid).cmdline())
        assert secrets["jwt_secret"] not in cmdline
        assert secrets["s3_secret_key"] not in cmdline


def test_the_connection_file_is_private_and_names_everything(hypha_stack):
    path = hypha_stack.write_connection_file(user="alice")
    assert path.stat().st_mode & 0o077 == 0
    conn = read_connection_file(hypha_stack.data_dir)
    assert conn["server_url"] == hypha_stack.server_url
    assert conn["service_id"] == "bioimage-io/cellpose-finetuning"
    assert conn["s3_endpoint"] == hypha_stack.s3_endpoint
    assert jwt.get_unverified_claims(conn["token"])["sub"] == "alice"
    assert tuple(conn) == CONNECTION_KEYS  # the keys serve writes too
    assert conn["collection"] == "bioimage-io/colab-annotations"
    assert conn["user"] == "alice" and conn["backend"] is None
    with pytest.raises(TypeError):  # no key of its own
        hypha_stack.write_connection_file(extra={"colour": "red"})


async def test_provisioning_for_a_server_url_makes_the_users_workspace_and_refuses_anothers(
    hypha_stack,
):
    # What `serve --server-url URL --workspace carol-lab` does with carol's token.
    carol = await _connect(hypha_stack, "carol")
    try:
        for _ in range(2):  # the second time both exist: checked, not created again
            ws = await provision(carol, hypha_stack.server_url, "carol-lab", "models")
            try:
                assert ws.config.workspace == "carol-lab"
                am = await ws.get_service("public/artifact-manager")
                collection = await am.read("carol-lab/models")
                assert collection["type"] == "collection"
                permissions = collection["config"]["permissions"]
                assert (permissions["*"], permissions["@"]) == ("r", "r+")
            finally:
                await ws.disconnect()
        assert "carol" in (await carol.get_workspace_info("carol-lab"))["owners"]
    finally:
        await carol.disconnect()
    dave = await _connect(hypha_stack, "dave")
    try:
        with pytest.raises(StackError, match="carol-lab"):
            await provision(dave, hypha_stack.server_url, "carol-lab", "models")
    finally:
        await dave.disconnect()


# --------------------------------------------------------------------------- own stacks
async def test_a_dataset_survives_stop_and_restart(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("restart")
    config = test_stack_config(data_dir)
    timings: dict[str, float] = {}

    stack = EmbeddedStack(config)
    t0 = time.monotonic()
    await asyncio.to_thread(stack.start)
    timings["first start"] = time.monotonic() - t0
    try:
        alice = await _connect(stack, "alice")
        am = await alice.get_service("public/artifact-manager")
        ds = await am.create(alias="keep-me", type="dataset", stage=True, manifest={"name": "k"})
        url = await am.put_file(ds["id"], file_path="hello.txt")
        async with httpx.AsyncClient(trust_env=False) as http:
            (await http.put(url, content=b"hello world")).raise_for_status()
            await am.commit(ds["id"])
            url = await am.get_file(ds["id"], file_path="hello.txt")
            assert (await http.get(url)).content == b"hello world"
        await alice.disconnect()
        pids = stack.pids
        assert set(pids) == {"weed", "hypha"}
    finally:
        t0 = time.monotonic()
        await asyncio.to_thread(stack.stop)
        timings["stop"] = time.monotonic() - t0
    assert stack.pids == {}
    assert all(_gone(pid) for pid in pids.values())
    assert not _processes_on(data_dir)
    stack.stop()  # idempotent

    again = EmbeddedStack(config)  # a new supervisor: only the directory carries over
    t0 = time.monotonic()
    await asyncio.to_thread(again.start)
    timings["restart"] = time.monotonic() - t0
    try:
        alice = await _connect(again, "alice")
        am = await alice.get_service("public/artifact-manager")
        ds = await am.read("ws-user-alice/keep-me")
        assert ds["versions"][0]["version"] == "v0"
        async with httpx.AsyncClient(trust_env=False) as http:
            url = await am.get_file(ds["id"], file_path="hello.txt")
            assert (await http.get(url)).content == b"hello world"
        assert (await am.read(again.collection_id))["type"] == "collection"
        await alice.disconnect()
    finally:
        t0 = time.monotonic()
        await asyncio.to_thread(again.stop)
        timings["second stop"] = time.monotonic() - t0
    assert not _processes_on(data_dir)
    print("stack timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))


@pytest.mark.slow
async def test_servers_left_by_a_killed_supervisor_are_stopped_at_the_next_start(tmp_path):
    import subprocess
    import sys

    config = test_stack_config(tmp_path)
    fields = ("hypha_port", "s3_port", "weed_master_port", "weed_volume_port", "weed_filer_port")
    settings = {"data_dir": str(tmp_path), **{f: getattr(config, f) for f in fields}}
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys, time\n"
            "from cellpose_finetuning.deploy.stack import EmbeddedStack, StackConfig\n"
            "stack = EmbeddedStack(StackConfig(**json.loads(sys.argv[1]))).start()\n"
            "print(json.dumps(stack.pids), flush=True)\n"
            "time.sleep(600)\n",
            json.dumps(settings),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = await asyncio.to_thread(supervisor.stdout.readline)
    finally:
        supervisor.kill()  # no stop(), no atexit: its servers keep running
        supervisor.wait()
        supervisor.stdout.close()
    if not line.startswith("{"):
        for proc in _processes_on(tmp_path):
            proc.kill()
    orphans = json.loads(line)
    assert set(orphans) == {"weed", "hypha"}
    assert not any(_gone(pid) for pid in orphans.values())

    stack = EmbeddedStack(config)  # same ports and directory: the orphans must go first
    try:
        await asyncio.to_thread(stack.start)
        assert all(_gone(pid) for pid in orphans.values())
        assert stack.running
    finally:
        await asyncio.to_thread(stack.stop)
        for proc in _processes_on(tmp_path):  # only if the test failed
            proc.kill()
    assert not _processes_on(tmp_path)


def test_a_signal_handler_calling_stop_during_start_leaves_nothing(tmp_path):
    """What the CLI does on Ctrl-C: its SIGINT handler calls stop() while start() waits."""
    import os
    import signal
    import threading

    stack = EmbeddedStack(test_stack_config(tmp_path))
    previous = signal.signal(signal.SIGUSR1, lambda *_: stack.stop())

    def interrupt_once_weed_runs() -> None:
        deadline = time.monotonic() + 30
        while "weed" not in stack.pids and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=interrupt_once_weed_runs, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(StackError, match="stopped while starting"):
            stack.start()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    print(f"interrupted start cleaned up in {time.monotonic() - t0:.1f} s")
    assert stack.pids == {}
    assert not _processes_on(tmp_path)
    assert not (tmp_path / "stack.pids").exists()


# --------------------------------------------------------------------------- serve --server-url
async def _serve_on(options):
    """Start ``serve``; return (task, stop) once it is ready (or raise its error)."""
    from cellpose_finetuning.deploy.serve import serve

    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(options, ready, stop))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=180, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task in done:
        task.result()
    assert ready.is_set(), "serve was not ready within 180 s"
    return task, stop


async def test_serve_on_a_server_url_provisions_its_workspace_and_writes_the_same_keys(
    hypha_stack, tmp_path
):
    from hypha_rpc import connect_to_server

    from cellpose_finetuning.deploy.serve import ServeOptions

    data_dir = tmp_path / "erin"
    options = ServeOptions(
        data_dir=data_dir,
        server_url=hypha_stack.server_url,
        workspace="erin-lab",
        token=hypha_stack.token("erin"),
        service_config={"worker_threads": 1},
    )
    task, stop = await _serve_on(options)
    try:
        conn = read_connection_file(data_dir)
        assert tuple(conn) == CONNECTION_KEYS
        assert conn["service_id"] == "erin-lab/cellpose-finetuning"
        assert conn["collection"] == "erin-lab/colab-annotations"
        assert conn["token"] is None and conn["user"] is None  # no user token to hand out
        server = await connect_to_server(
            {"server_url": hypha_stack.server_url, "token": hypha_stack.token("erin")}
        )
        try:
            am = await server.get_service("public/artifact-manager")
            assert (await am.read("erin-lab/colab-annotations"))["type"] == "collection"
            svc = await server.get_service(conn["service_id"])
            assert "cpsam" in await svc.list_pretrained_models()
        finally:
            await server.disconnect()
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)
    assert not (data_dir / "connection.json").exists()


async def test_serve_refuses_a_token_that_expires_inside_the_deployment(hypha_stack, tmp_path):
    from cellpose_finetuning.deploy.serve import ServeOptions

    options = ServeOptions(
        data_dir=tmp_path / "short",
        server_url=hypha_stack.server_url,
        token=hypha_stack.token("erin", expires_in=2 * 3600),
    )
    with pytest.raises(InvalidInput, match=r"expires in 2\.0 h.*generate_token"):
        await _serve_on(options)
    assert not (tmp_path / "short" / "connection.json").exists()
