"""Run the service: on the embedded stack, or registered on an existing Hypha server.

``serve`` starts the stack (unless ``server_url`` is given), connects with the
service's own identity, registers :class:`CellposeService` as
``cellpose-finetuning`` (public, ``require_context``), writes
``connection.json`` and waits for SIGINT, SIGTERM or SIGHUP, then shuts
everything down in bounded time, in this order: running trainings are asked
to stop and keep their weights, the connections close, the Ray backend
removes its Serve application (and shuts down the Ray it started), then
Hypha and SeaweedFS stop. Whatever child process is still there at the end
is killed, and one line says what was stopped. A second signal skips the
waiting: the servers and Ray are killed at once, still leaving no process.

Credentials: on the embedded stack the service mints its own token from the
stack's secret (valid for a year, renewed at each start). On an external
server it uses the token it is given and refuses to start if that token
expires within a day (:func:`~cellpose_finetuning.deploy.stack.tokens.check_token_lifetime`),
rather than failing silently mid-run as the original deployment did.

The workspace and its model collection are created by the same code in both
cases (:mod:`cellpose_finetuning.deploy.stack.provisioning`), and
``connection.json`` is written by one writer
(:mod:`cellpose_finetuning.deploy.stack.connection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpose_finetuning.deploy.stack import (
    PRIVATE_UMASK,
    EmbeddedStack,
    StackConfig,
    StackError,
    check_token_lifetime,
    connection_record,
    connection_user,
    make_private,
    mask_token,
    provision,
    read_connection_file,
    remove_connection_file,
    token_expiry,
    write_connection_file,
)
from cellpose_finetuning.names import (
    DEFAULT_COLLECTION_ALIAS,
    DEFAULT_DATA_DIR,
    DEFAULT_USER,
    DEFAULT_WORKSPACE,
    MIN_TOKEN_LIFETIME_S,
    SERVICE_ID,
    SERVICE_TOKEN_LIFETIME_S,
    SERVICE_USER,
)

if TYPE_CHECKING:
    from cellpose_finetuning.data.s3direct import S3Access
    from cellpose_finetuning.deploy.ray_backend import RayBackend, RayOptions

# Names this module exported before deploy/stack/ held them; kept importable.
__all__ = [
    "DEFAULT_COLLECTION_ALIAS",
    "DEFAULT_WORKSPACE",
    "MIN_TOKEN_LIFETIME_S",
    "SERVICE_ID",
    "SERVICE_USER",
    "STOP_SIGNALS",
    "ServeOptions",
    "mask_token",
    "read_connection_file",
    "serve",
    "start_service",
    "token_expiry",
]

log = logging.getLogger(__name__)

#: Signals that stop ``serve``: Ctrl-C, a supervisor's stop, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Seconds running trainings get to stop and save their weights.
TRAINING_STOP_TIMEOUT = 60.0
#: Seconds the Ray backend gets to remove its application and shut Ray down.
RAY_STOP_TIMEOUT = 60.0


@dataclass
class ServeOptions:
    """What ``serve`` needs."""

    data_dir: Path = field(default_factory=lambda: DEFAULT_DATA_DIR)
    stack: StackConfig | None = None  # None with server_url: use an existing server
    server_url: str | None = None
    workspace: str | None = None
    token: str | None = None
    user: str = DEFAULT_USER
    service_config: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"  # "local" or "ray"
    ray: RayOptions | None = None  # with backend="ray"; defaults when None


async def start_service(
    server_url: str,
    token: str,
    data_dir: Path,
    service_config: dict[str, Any],
    workspace: str | None = None,
    executors: dict[str, Any] | None = None,
    s3: S3Access | None = None,
) -> tuple[Any, Any, Any, Any]:
    """Connect, build and register the service.

    The service reads artifacts through the connection of ``token`` (on the
    embedded stack an admin identity) and registers in ``workspace`` or the
    token's own workspace. ``workspace`` and its default collection are
    created if missing, or checked (owned by the token's user), by
    :func:`~cellpose_finetuning.deploy.stack.provisioning.provision`, the
    embedded stack's own provisioning. ``executors``
    (``inference``, ``training``) replace the in-process ones, e.g. with
    the Ray backend's. ``s3`` (the embedded stack's store and keys) lets the
    service read dataset files straight from S3 after its permission checks.

    Returns
    -------
    (connection, registering connection, service, registration info)
    """
    from hypha_rpc import connect_to_server

    from cellpose_finetuning.service.api import CellposeService, ServiceConfig
    from cellpose_finetuning.service.auth import WorkspaceOwners

    admin = await connect_to_server({"server_url": server_url, "token": token})
    server = admin
    if workspace and workspace != admin.config.workspace:
        server = await provision(admin, server_url, workspace, DEFAULT_COLLECTION_ALIAS)
    am = await admin.get_service("public/artifact-manager")
    service = CellposeService(
        ServiceConfig(data_dir=data_dir, **service_config),
        artifact_manager=am,
        server_url=server_url,
        owners=WorkspaceOwners(
            lookup=admin.get_workspace_info, service_user=connection_user(admin)
        ),
        s3=s3,
        **(executors or {}),
    )
    await service.start()
    info = await server.register_service(
        {
            "id": SERVICE_ID,
            "name": "Cellpose Fine-Tuning",
            "description": "Fine-tune Cellpose-SAM, follow training, segment, export.",
            "config": {"visibility": "public", "require_context": True},
            **service.service_functions(),
        }
    )
    return admin, server, service, info


def _backend_line(ray_backend: RayBackend | None) -> str:
    if ray_backend is None:
        return "local (inference in this process, training in worker processes)"
    o = ray_backend.options
    where = f"cluster {o.address}" if o.address else f"local Ray, {o.num_cpus} CPUs"
    replicas = str(o.inference_replicas)
    if o.max_inference_replicas and o.max_inference_replicas > o.inference_replicas:
        replicas += f"-{o.max_inference_replicas}"
    return f"ray ({where}; {replicas} inference replicas, {o.replica_gpus:g} GPU each)"


def _token_line(token: str, user: str, connection_file: Path, interactive: bool) -> str:
    """The banner's token line: in full on a terminal, masked in a log."""
    more = "more users: cellpose-finetuning token --user NAME"
    if interactive:
        return f"  token      : {token}   (user '{user}'; {more})\n"
    return (
        f"  token      : {mask_token(token)}   (user '{user}'; masked: not a terminal; the full "
        f"token is in {connection_file}, readable by this user only; {more})\n"
    )


class _StopControl:
    """What the stop signals do: the first stops cleanly, the second at once."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.force = asyncio.Event()
        self.signal: str | None = None
        self.on_force: list[Callable[[], None]] = []

    def handle(self, sig: signal.Signals) -> None:
        name = signal.Signals(sig).name
        if not self.stop.is_set():
            self.signal = name
            self.stop.set()
            print(
                f"{name}: stopping (running trainings keep their weights); "
                f"send it again to stop at once",
                file=sys.stderr,
                flush=True,
            )
        elif not self.force.is_set():
            self.signal = self.signal or name
            self.force.set()
            print(f"{name} again: stopping at once", file=sys.stderr, flush=True)
            for callback in self.on_force:
                callback()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """(Re)install the handlers: Ray's startup replaces SIGTERM's with its own."""
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.handle, sig)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def _in_thread(func: Callable[[], Any]) -> Any:
    """Run blocking ``func`` in a daemon thread, which never holds up the exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value, error = func(), None
        except BaseException as exc:
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop may be closed by then
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name=getattr(func, "__name__", "stop"), daemon=True).start()
    return await future


async def _bounded(awaitable: Any, timeout: float, force: asyncio.Event) -> bool:
    """Wait for ``awaitable`` until ``timeout`` or ``force``; True if it finished."""
    task = asyncio.ensure_future(awaitable)
    forced = asyncio.ensure_future(force.wait())
    try:
        done, _ = await asyncio.wait({task, forced}, timeout=timeout, return_when="FIRST_COMPLETED")
    finally:
        forced.cancel()
    if task in done:
        if task.exception() is not None:
            log.warning("while stopping: %s", task.exception())
        return True
    task.cancel()  # a thread behind it keeps going; the final sweep ends its processes
    return False


def _child_processes() -> list[Any]:
    """This process's descendants, but multiprocessing's resource tracker (it ends with us)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if "multiprocessing.resource_tracker" in " ".join(proc.cmdline()):
                continue
        except psutil.Error:
            continue
        found.append(proc)
    return found


def _kill_children(grace: float) -> list[str]:
    """Stop every process this one started that is still there; their names."""
    import psutil

    procs = _child_processes()
    names = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            names.append(f"{proc.name()} ({proc.pid})")
            proc.terminate()
    _, left = psutil.wait_procs(procs, timeout=grace)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=5)
    return names


@dataclass
class _Running:
    """What ``serve`` has started so far, for the shutdown."""

    stack: EmbeddedStack | None = None
    ray_backend: RayBackend | None = None
    admin: Any = None
    server: Any = None
    service: Any = None


async def _shutdown(
    state: _Running, control: _StopControl, data_dir: Path, own_process: bool
) -> list[str]:
    """Stop everything ``serve`` started, in order, in bounded time; what was done.

    With ``own_process`` (the ``serve`` command), any child process still
    there at the end is killed: the process is this service's alone.
    """
    done: list[str] = []
    force = control.force
    t0 = time.monotonic()

    def took() -> str:
        nonlocal t0
        seconds, t0 = time.monotonic() - t0, time.monotonic()
        return f" ({seconds:.1f} s)"

    if state.service is not None:
        queue = state.service.queue
        running = len(getattr(queue, "running", []) or [])
        finished = await _bounded(state.service.close(), TRAINING_STOP_TIMEOUT, force)
        finished = finished and not getattr(queue, "running", [])
        if running:
            plural, their = ("s", "their") if running > 1 else ("", "its")
            done.append(
                (
                    f"{running} training{plural} stopped with {their} weights"
                    if finished
                    else f"{running} training{plural} interrupted (last checkpoint kept)"
                )
                + took()
            )
    for conn in {id(c): c for c in (state.server, state.admin) if c is not None}.values():
        await _bounded(conn.disconnect(), 5.0, force)
    took()
    if state.ray_backend is not None:
        backend = state.ray_backend
        control.on_force.append(lambda: threading.Thread(target=backend.kill, daemon=True).start())
        finished = False
        if not force.is_set():
            finished = await _bounded(_in_thread(backend.stop), RAY_STOP_TIMEOUT, force)
        if not finished:
            await _in_thread(backend.kill)
        local = backend.options.address is None
        done.append(
            ("Ray shut down" if local else "Serve application removed")
            if finished
            else ("Ray killed" if local else "Serve application left on the cluster")
        )
        done[-1] += took()
    if state.stack is not None:
        stack = state.stack
        control.on_force.append(
            lambda: threading.Thread(target=lambda: stack.stop(force=True), daemon=True).start()
        )
        await _in_thread(lambda: stack.stop(force=force.is_set()))
        done.append("Hypha and SeaweedFS " + ("killed" if force.is_set() else "stopped") + took())
    remove_connection_file(data_dir)
    if own_process:
        killed = await _in_thread(lambda: _kill_children(0.0 if force.is_set() else 5.0))
        if killed:
            log.warning("killed processes left at the end: %s", ", ".join(killed))
            done.append(f"killed {len(killed)} leftover process(es): {', '.join(killed)}")
    return done


async def _start(
    options: ServeOptions, data_dir: Path, state: _Running, control: _StopControl
) -> dict[str, Any]:
    """Start the backend, the stack (or join a server) and register the service."""
    loop = asyncio.get_running_loop()
    executors: dict[str, Any] = {}
    if options.backend == "ray":
        from cellpose_finetuning.deploy.ray_backend import RayBackend, RayOptions

        ray_options = options.ray or RayOptions()
        ray_options.max_concurrent_trainings = options.service_config.get(
            "max_concurrent_trainings", ray_options.max_concurrent_trainings
        )
        # infer's fair gate admits as many calls as there are replicas to run them
        options.service_config.setdefault(
            "inference_concurrency",
            max(ray_options.max_inference_replicas or 0, ray_options.inference_replicas),
        )
        state.ray_backend = RayBackend(ray_options, state_dir=data_dir)
        try:
            # Not in a short-lived thread: Ray's processes are killed when the
            # thread that started them ends (PR_SET_PDEATHSIG); the executor's
            # threads live as long as the event loop.
            await asyncio.to_thread(state.ray_backend.start)
        finally:
            # Ray's core worker installs a handler that prints a native stack
            # trace on SIGTERM and then aborts: take the signals back.
            control.install(loop)
        executors = {
            "inference": state.ray_backend.inference(),
            "training": state.ray_backend.training(),
        }
    elif options.backend != "local":
        raise StackError(f"--backend: {options.backend!r} is not 'local' or 'ray'")
    if control.stop.is_set():
        raise asyncio.CancelledError
    if options.server_url:
        server_url = options.server_url
        token = options.token or os.environ.get("HYPHA_TOKEN")
        if not token:
            raise StackError("no token: pass --token or set HYPHA_TOKEN")
        check_token_lifetime(token)
        user_token = None
        workspace = options.workspace
    else:
        cfg = options.stack or StackConfig(data_dir=data_dir)
        cfg.data_dir = data_dir
        state.stack = EmbeddedStack(cfg)
        await _in_thread(state.stack.start)
        server_url = state.stack.server_url
        token = state.stack.token(
            cfg.service_user, expires_in=SERVICE_TOKEN_LIFETIME_S, roles=("admin",)
        )
        user_token = state.stack.token(options.user)
        workspace = options.workspace or cfg.workspace
    state.admin, state.server, state.service, info = await start_service(
        server_url,
        token,
        data_dir,
        options.service_config,
        workspace,
        executors,
        s3=state.stack.s3_access() if state.stack is not None else None,
    )
    workspace = state.server.config.workspace
    fields: dict[str, Any] = {
        "workspace": workspace,
        "service_id": f"{workspace}/{SERVICE_ID}",
        "full_service_id": info["id"],
        "backend": options.backend,
        "started_at": datetime.now(UTC),
    }
    if state.stack is not None:
        return state.stack.connection_record(user=options.user, token=user_token, **fields)
    provisioned = state.server is not state.admin
    return connection_record(
        server_url=server_url,
        data_dir=data_dir,
        collection=f"{workspace}/{DEFAULT_COLLECTION_ALIAS}" if provisioned else None,
        **fields,
    )


async def serve(
    options: ServeOptions,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    *,
    interactive: bool | None = None,
    own_process: bool = False,
) -> dict[str, Any]:
    """Run until ``stop`` is set or SIGINT, SIGTERM or SIGHUP arrives.

    Parameters
    ----------
    options : ServeOptions
        Where and how to run.
    ready : asyncio.Event, optional
        Set once the service is registered and ``connection.json`` written.
    stop : asyncio.Event, optional
        Set it to shut down.
    interactive : bool, optional
        Print the user's token in full (default: when standard output is a
        terminal). Otherwise it is masked: a supervisor keeps stdout in logs.
    own_process : bool
        This process runs nothing but the service (the ``serve`` command): at
        the end every child process still there is killed.

    Returns
    -------
    dict
        ``signal`` (the first stop signal's name, or None), ``forced`` (a
        second signal cut the shutdown short) and ``summary`` (the line
        printed at the end).
    """
    data_dir = make_private(Path(options.data_dir).expanduser().resolve())
    old_umask = os.umask(PRIVATE_UMASK)  # sessions, cache, models: 0600 files, 0700 folders
    stop = stop or asyncio.Event()
    if interactive is None:
        interactive = sys.stdout.isatty()
    loop = asyncio.get_running_loop()
    control = _StopControl(stop)
    control.install(loop)
    state = _Running()
    started = time.monotonic()
    serving = False
    result: dict[str, Any] = {"signal": None, "forced": False, "summary": None}
    try:
        startup = asyncio.ensure_future(_start(options, data_dir, state, control))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({startup, stopped}, return_when="FIRST_COMPLETED")
        if not startup.done():
            # Stopped while starting: abort the stack's start (it fails with
            # StackError), wait for the rest to unwind, then clean up below.
            if state.stack is not None:
                await _in_thread(state.stack.stop)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await startup
            return result
        stopped.cancel()
        if startup.cancelled() or (stop.is_set() and startup.exception() is not None):
            return result
        connection = startup.result()
        connection_file = write_connection_file(data_dir, connection)
        workspace = connection["workspace"]
        user_token = connection["token"]
        print(
            f"cellpose-finetuning is serving\n"
            f"  server URL : {connection['server_url']}\n"
            f"  workspace  : {workspace}\n"
            f"  service id : {workspace}/{SERVICE_ID}\n"
            + (f"  web page   : {connection['page_url']}\n" if connection["page_url"] else "")
            + (
                _token_line(user_token, options.user, connection_file, interactive)
                if user_token
                else ""
            )
            + f"  backend    : {_backend_line(state.ray_backend)}\n"
            + f"  details    : {connection_file}\n"
            f"Press Ctrl-C to stop (or send SIGTERM or SIGHUP).",
            flush=True,
        )
        serving = True
        started = time.monotonic()
        if ready:
            ready.set()
        await stop.wait()
    finally:
        t0 = time.monotonic()
        done = await _shutdown(state, control, data_dir, own_process)
        control.remove(loop)
        result.update(signal=control.signal, forced=control.force.is_set())
        if serving or control.signal:
            why = f"on {control.signal}" if control.signal else "on request"
            up = f" after {time.monotonic() - started:.0f} s" if serving else " while starting"
            what = "; ".join(done) if done else "nothing was running"
            result["summary"] = (
                f"cellpose-finetuning stopped {why}{up}, in {time.monotonic() - t0:.1f} s: {what}"
            )
            print(result["summary"], flush=True)
        os.umask(old_umask)
    return result
