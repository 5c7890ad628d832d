"""Run the service: on the embedded stack, or registered on an existing Hypha server.

``serve`` starts the stack (unless ``server_url`` is given), connects with the
service's own identity, registers :class:`CellposeService` as
``cellpose-finetuning`` (public, ``require_context``), writes
``connection.json`` and waits for SIGINT/SIGTERM, then shuts everything down.

Credentials: on the embedded stack the service mints its own token from the
stack's secret (valid for a year, renewed at each start). On an external
server it uses the token it is given and refuses to start if that token
expires within a day, rather than failing silently mid-run as the original
deployment did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpose_finetuning.deploy.stack import (
    PRIVATE_UMASK,
    EmbeddedStack,
    StackConfig,
    StackError,
    make_private,
    read_connection_file,
)

if TYPE_CHECKING:
    from cellpose_finetuning.deploy.ray_backend import RayBackend, RayOptions

__all__ = ["SERVICE_ID", "ServeOptions", "read_connection_file", "serve", "token_expiry"]

log = logging.getLogger(__name__)

SERVICE_ID = "cellpose-finetuning"
SERVICE_USER = "cellpose-service"
#: The embedded stack registers the service where the original lived, so the
#: contract's ``get_service("bioimage-io/cellpose-finetuning")`` works verbatim.
DEFAULT_WORKSPACE = "bioimage-io"
#: ...and its default export collection, ``bioimage-io/colab-annotations``.
DEFAULT_COLLECTION_ALIAS = "colab-annotations"
MIN_TOKEN_LIFETIME_S = 24 * 3600


@dataclass
class ServeOptions:
    """What ``serve`` needs."""

    data_dir: Path = field(default_factory=lambda: Path.home() / ".cellpose-finetuning")
    stack: StackConfig | None = None  # None with server_url: use an existing server
    server_url: str | None = None
    workspace: str | None = None
    token: str | None = None
    user: str = "local-user"
    service_config: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"  # "local" or "ray"
    ray: RayOptions | None = None  # with backend="ray"; defaults when None


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified), or None."""
    from jose import jwt

    try:
        exp = jwt.get_unverified_claims(token).get("exp")
    except Exception:
        return None
    return float(exp) if exp else None


def _write_private(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


async def _workspace_connection(admin: Any, server_url: str, workspace: str) -> Any:
    """Create ``workspace`` (owned by the service) if needed and connect to it."""
    from hypha_rpc import connect_to_server

    try:
        await admin.create_workspace(
            {
                "id": workspace,
                "name": workspace,
                "description": "cellpose-finetuning service",
                "owners": [SERVICE_USER],
                "persistent": True,
            }
        )
    except Exception as exc:
        if "exist" not in str(exc).lower():
            raise
    token = await admin.generate_token({"workspace": workspace, "expires_in": 365 * 24 * 3600})
    return await connect_to_server(
        {"server_url": server_url, "token": token, "workspace": workspace}
    )


async def _ensure_collection(server: Any, alias: str) -> None:
    """Create the default model collection of the workspace if it is missing.

    Anyone may read it; logged-in users may add models (through the service,
    which checks this again for each export).
    """
    am = await server.get_service("public/artifact-manager")
    try:
        await am.read(f"{server.config.workspace}/{alias}")
    except Exception:
        await am.create(
            type="collection",
            alias=alias,
            manifest={
                "name": "Cellpose fine-tuned models",
                "description": "BioImage.IO models exported by cellpose-finetuning",
            },
            config={"permissions": {"*": "r", "@": "r+"}},
        )


def _connection_user(server: Any) -> str | None:
    """The user id that artifacts created through a connection carry as ``created_by``.

    Hypha records the *effective* user: the parent of a child token
    (``generate_token``, as BioEngine deployments use), else the user itself.
    """
    user = (getattr(server, "config", None) or {}).get("user") or {}
    if not isinstance(user, dict):
        return None
    uid = user.get("parent") or user.get("id")
    return str(uid) if uid else None


async def start_service(
    server_url: str,
    token: str,
    data_dir: Path,
    service_config: dict[str, Any],
    workspace: str | None = None,
    executors: dict[str, Any] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """Connect, build and register the service.

    The service reads artifacts through the connection of ``token`` (on the
    embedded stack an admin identity) and registers in ``workspace``
    (created if missing) or the token's own workspace. ``executors``
    (``inference``, ``training``) replace the in-process ones, e.g. with
    the Ray backend's.

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
        server = await _workspace_connection(admin, server_url, workspace)
    am = await admin.get_service("public/artifact-manager")
    if workspace and server is not admin:
        await _ensure_collection(server, DEFAULT_COLLECTION_ALIAS)
    service = CellposeService(
        ServiceConfig(data_dir=data_dir, **service_config),
        artifact_manager=am,
        server_url=server_url,
        owners=WorkspaceOwners(
            lookup=admin.get_workspace_info, service_user=_connection_user(admin)
        ),
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


async def serve(
    options: ServeOptions, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives.

    Parameters
    ----------
    options : ServeOptions
        Where and how to run.
    ready : asyncio.Event, optional
        Set once the service is registered and ``connection.json`` written.
    stop : asyncio.Event, optional
        Set it to shut down.
    """
    data_dir = make_private(Path(options.data_dir).expanduser().resolve())
    old_umask = os.umask(PRIVATE_UMASK)  # sessions, cache, models: 0600 files, 0700 folders
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    stack: EmbeddedStack | None = None
    ray_backend: RayBackend | None = None
    admin = server = service = None
    try:
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
            ray_backend = RayBackend(ray_options)
            await asyncio.to_thread(ray_backend.start)
            executors = {"inference": ray_backend.inference(), "training": ray_backend.training()}
        elif options.backend != "local":
            raise StackError(f"--backend: {options.backend!r} is not 'local' or 'ray'")
        if options.server_url:
            server_url = options.server_url
            token = options.token or os.environ.get("HYPHA_TOKEN")
            if not token:
                raise StackError("no token: pass --token or set HYPHA_TOKEN")
            exp = token_expiry(token)
            if exp is not None and exp - time.time() < MIN_TOKEN_LIFETIME_S:
                when = datetime.fromtimestamp(exp, UTC).isoformat()
                raise StackError(
                    f"the token expires at {when}, in less than a day; get a fresh one"
                )
            user_token = None
            workspace = options.workspace
        else:
            cfg = options.stack or StackConfig(data_dir=data_dir)
            cfg.data_dir = data_dir
            stack = EmbeddedStack(cfg)
            await asyncio.to_thread(stack.start)
            server_url = stack.server_url
            token = stack.token(SERVICE_USER, expires_in=365 * 24 * 3600, roles=("admin",))
            user_token = stack.token(options.user)
            workspace = options.workspace or DEFAULT_WORKSPACE
        admin, server, service, info = await start_service(
            server_url, token, data_dir, options.service_config, workspace, executors
        )
        workspace = server.config.workspace
        connection = {
            "server_url": server_url,
            "workspace": workspace,
            "service_id": f"{workspace}/{SERVICE_ID}",
            "full_service_id": info["id"],
            "page_url": stack.page_url if stack else None,
            "user": options.user if user_token else None,
            "token": user_token,
            "data_dir": str(data_dir),
            "pid": os.getpid(),
            "backend": options.backend,
            "started_at": datetime.now(UTC).isoformat(),
        }
        _write_private(data_dir / "connection.json", connection)
        print(
            f"cellpose-finetuning is serving\n"
            f"  server URL : {server_url}\n"
            f"  workspace  : {workspace}\n"
            f"  service id : {workspace}/{SERVICE_ID}\n"
            + (f"  web page   : {stack.page_url}\n" if stack and stack.page_url else "")
            + (
                f"  token      : {user_token}   (user '{options.user}'; more users: "
                f"cellpose-finetuning token --user NAME)\n"
                if user_token
                else ""
            )
            + f"  backend    : {_backend_line(ray_backend)}\n"
            + f"  details    : {data_dir / 'connection.json'}\n"
            f"Press Ctrl-C to stop.",
            flush=True,
        )
        if ready:
            ready.set()
        await stop.wait()
    finally:
        if service is not None:
            with contextlib.suppress(Exception):
                await service.close()
        for conn in {id(c): c for c in (server, admin) if c is not None}.values():
            with contextlib.suppress(Exception):
                await conn.disconnect()
        if ray_backend is not None:
            await asyncio.to_thread(ray_backend.stop)
        if stack is not None:
            await asyncio.to_thread(stack.stop)
        with contextlib.suppress(FileNotFoundError):
            (data_dir / "connection.json").unlink()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        os.umask(old_umask)
