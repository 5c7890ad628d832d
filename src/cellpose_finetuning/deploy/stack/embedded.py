"""The embedded stack: SeaweedFS (S3) + Hypha (SQLite), started, supervised and stopped as one.

:class:`EmbeddedStack` puts together the parts of this package: its
settings (:mod:`.config`), its child processes (:mod:`.processes`),
SeaweedFS (:mod:`.seaweedfs`), Hypha (:mod:`.hypha`), the service's
workspace and collection (:mod:`.provisioning`), tokens (:mod:`.tokens`)
and ``connection.json`` (:mod:`.connection`). The order and the recipe are
described in :mod:`cellpose_finetuning.deploy.stack`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cellpose_finetuning.deploy.stack import connection as _connection
from cellpose_finetuning.deploy.stack import processes
from cellpose_finetuning.deploy.stack.config import (
    StackConfig,
    StackError,
    check_platform,
    port_is_free,
)
from cellpose_finetuning.deploy.stack.files import make_private
from cellpose_finetuning.deploy.stack.hypha import http_ok, hypha_command, hypha_env, web_mount
from cellpose_finetuning.deploy.stack.provisioning import provision
from cellpose_finetuning.deploy.stack.seaweedfs import (
    s3_accepts_keys,
    weed_command,
    write_identities,
)
from cellpose_finetuning.deploy.stack.tokens import (
    SERVICE_TOKEN_LIFETIME,
    USER_TOKEN_LIFETIME,
    mint_token,
    user_workspace,
)
from cellpose_finetuning.names import SERVICE_ID, STACK_S3_BUCKET, STACK_S3_REGION

if TYPE_CHECKING:
    from filelock import FileLock

    from cellpose_finetuning.data.s3direct import S3Access

__all__ = ["EmbeddedStack"]

log = logging.getLogger(__name__)

T = TypeVar("T")


# --------------------------------------------------------------------------- stack
class EmbeddedStack:
    """Start, supervise and stop SeaweedFS + Hypha on one data directory.

    Parameters
    ----------
    config : StackConfig, optional
        Ports, names and data directory (defaults: ``~/.cellpose-finetuning``,
        ports 9527 and 9483).

    Examples
    --------
    >>> with EmbeddedStack(StackConfig(data_dir=tmp)) as stack:    # doctest: +SKIP
    ...     token = stack.token("alice")    # alice works in ws-user-alice
    ...     url = stack.server_url

    ``stop()`` is idempotent and may be called from a signal handler; a second
    call while one is under way (a second Ctrl-C) kills what is left at once.
    """

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.data_dir = Path(self.config.data_dir).expanduser().resolve()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_offsets: dict[str, int] = {}
        self._secrets: dict[str, str] | None = None
        self._lock: FileLock | None = None
        self._stopping = False
        self._aborted = False
        self._connection_written = False
        self.started_at: datetime | None = None
        #: the web page's address once Hypha serves it (see :meth:`_web_mount`)
        self.page_url: str | None = None
        #: seconds each phase of the last start took (weed, hypha, provision, total)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ identity
    @property
    def secrets(self) -> dict[str, str]:
        """JWT secret and S3 keys, created on first use and kept (0600)."""
        if self._secrets is None:
            path = self.data_dir / "secret.json"
            if path.is_file():
                self._secrets = json.loads(path.read_text())
            else:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                created = {
                    "jwt_secret": secrets.token_urlsafe(32),
                    "s3_access_key": "cpft" + secrets.token_hex(6),
                    "s3_secret_key": secrets.token_urlsafe(24),
                }
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:  # another process created it meanwhile
                    self._secrets = json.loads(path.read_text())
                else:
                    with os.fdopen(fd, "w") as fh:
                        json.dump(created, fh)
                    self._secrets = created
        if self.config.jwt_secret:
            return {**self._secrets, "jwt_secret": self.config.jwt_secret}
        return self._secrets

    @property
    def jwt_secret(self) -> str:
        """The secret Hypha signs and checks tokens with."""
        return self.secrets["jwt_secret"]

    def token(
        self,
        user_id: str,
        *,
        expires_in: int = USER_TOKEN_LIFETIME,
        roles: tuple[str, ...] = (),
        workspace: str | None = None,
    ) -> str:
        """A token for ``user_id`` on this stack (their workspace: ``ws-user-<id>``)."""
        return mint_token(
            user_id, secret=self.jwt_secret, expires_in=expires_in, roles=roles, workspace=workspace
        )

    def service_token(
        self, *, expires_in: int = SERVICE_TOKEN_LIFETIME, workspace: str | None = None
    ) -> str:
        """The service's own token: admin role, landing in the service workspace.

        A token cannot be renewed once issued; the service, which runs next to
        the stack and can read its secret, mints a fresh one (with this
        method or :func:`mint_token`) at each start and before this one
        expires, instead of failing when it runs out.
        """
        return self.token(
            self.config.service_user,
            expires_in=expires_in,
            roles=("admin",),
            workspace=workspace or self.config.workspace,
        )

    # ------------------------------------------------------------------ addresses
    @property
    def server_url(self) -> str:
        """Hypha's URL."""
        return self.config.server_url

    @property
    def s3_endpoint(self) -> str:
        """SeaweedFS's S3 URL."""
        return self.config.s3_endpoint

    def s3_access(self) -> S3Access:
        """Where Hypha keeps artifact files and the keys it uses: for the service's direct reads."""
        from cellpose_finetuning.data.s3direct import S3Access

        return S3Access(
            endpoint_url=self.s3_endpoint,
            access_key_id=self.secrets["s3_access_key"],
            secret_access_key=self.secrets["s3_secret_key"],
            bucket=STACK_S3_BUCKET,
            region_name=STACK_S3_REGION,
        )

    @property
    def workspace(self) -> str:
        """The service's workspace."""
        return self.config.workspace

    @property
    def service_id(self) -> str:
        """What users pass to ``get_service``: ``<workspace>/cellpose-finetuning``."""
        return f"{self.config.workspace}/{SERVICE_ID}"

    @property
    def collection_id(self) -> str:
        """The default model collection: ``<workspace>/<collection_alias>``."""
        return f"{self.config.workspace}/{self.config.collection_alias}"

    @property
    def pids(self) -> dict[str, int]:
        """Process ids (= process group ids) of the running children."""
        return {n: p.pid for n, p in self._procs.items() if p.poll() is None}

    @property
    def running(self) -> bool:
        """Whether both servers run."""
        return set(self.pids) == {"weed", "hypha"}

    def check(self) -> None:
        """Raise :class:`StackError` if a server has died since the start."""
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited (code {proc.returncode}); last lines of "
                    f"{self._log_path(name)}:\n{self._tail(name)}"
                )

    # ------------------------------------------------------------------ start
    def check_ports(self) -> None:
        """Raise :class:`StackError` naming every busy port (nothing is started)."""
        busy = [
            (option, port, what)
            for option, port, what in self.config.port_plan()
            if not port_is_free(port, self.config.host)
        ]
        if busy:
            lines = [
                f"port {port} ({what}) is busy on {self.config.host}" for _, port, what in busy
            ]
            options = sorted({option for option, _, _ in busy})
            raise StackError(
                "; ".join(lines)
                + f". Choose other ports with {', '.join(options)}"
                + " (or stop what uses them)."
            )

    def start(self) -> EmbeddedStack:
        """Start SeaweedFS, then Hypha, then create the service workspace.

        Returns when both servers are ready. On any failure, whatever was
        started is stopped before the error is raised.

        Raises
        ------
        StackError
            A port is busy, another stack runs on ``data_dir``, a server exited
            or was not ready within ``startup_timeout``.
        """
        if self.running:
            return self
        check_platform()
        if self._procs:  # one of them died: start both afresh
            self.stop()
        self.config.validate()
        self._aborted = False
        make_private(self.data_dir)
        self._acquire_lock()
        atexit.register(self.stop)  # unregistered by stop()
        t0 = time.monotonic()
        try:
            self._stop_leftovers()
            self.check_ports()
            for sub in ("s3/data", "hypha", "logs"):
                (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
            self._start_weed()
            self.timings["weed"] = time.monotonic() - t0
            self._start_hypha()
            self.timings["hypha"] = time.monotonic() - t0 - self.timings["weed"]
            t1 = time.monotonic()
            try:
                self._run_async(self._provision)
            except Exception as exc:
                if isinstance(exc, StackError) or self._aborted:
                    raise
                raise StackError(
                    f"creating workspace {self.workspace!r} and collection "
                    f"{self.collection_id!r} failed: {exc}; last lines of "
                    f"{self._log_path('hypha')}:\n{self._tail('hypha')}"
                ) from exc
            self.timings["provision"] = time.monotonic() - t1
        except BaseException as exc:
            aborted = self._aborted
            self.stop()
            if aborted and isinstance(exc, Exception) and not isinstance(exc, StackError):
                raise StackError("the stack was stopped while starting") from exc
            raise
        self.timings["total"] = time.monotonic() - t0
        self.started_at = datetime.now(UTC)
        log.info("stack ready in %.1f s at %s", self.timings["total"], self.server_url)
        return self

    def _acquire_lock(self) -> None:
        """Hold ``stack.lock`` (an OS lock through ``filelock``: released if we die)."""
        if self._lock is None:
            self._lock = processes.acquire_lock(self.data_dir)

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            processes.release_lock(self.data_dir, lock)

    def _stop_leftovers(self) -> None:
        """Stop servers a crashed supervisor left running on this directory."""
        processes.stop_leftovers(
            self.data_dir,
            [("hypha", self.config.hypha_stop_timeout), ("weed", self.config.weed_stop_timeout)],
        )

    def _write_pids(self) -> None:
        processes.write_pids(self.data_dir, self.pids)

    def _log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        if self._aborted:
            raise StackError("the stack was stopped while starting")
        proc, self._log_offsets[name] = processes.spawn(cmd, env, cwd, self._log_path(name))
        self._procs[name] = proc
        self._write_pids()
        if self._aborted:  # stop() ran between the check above and now
            self.stop()
            raise StackError("the stack was stopped while starting")
        return proc

    def _tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines this start wrote to ``name``'s log."""
        return processes.log_tail(self._log_path(name), self._log_offsets.get(name, 0), lines)

    def _wait_until(self, name: str, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready`` until true; fail fast if ``name`` exits or stop() is called."""
        deadline = time.monotonic() + self.config.startup_timeout
        while True:
            proc = self._procs.get(name)
            if self._aborted or proc is None:
                raise StackError("the stack was stopped while starting")
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited during startup (code {proc.returncode}); last lines of "
                    f"{self._log_path(name)}:\n{self._tail(name)}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{name}: {what} not ready after {self.config.startup_timeout:.0f} s; "
                    f"last lines of {self._log_path(name)}:\n{self._tail(name)}"
                )
            time.sleep(0.2)

    def _start_weed(self) -> None:
        c, s = self.config, self.secrets
        s3_conf = write_identities(
            self.data_dir / "s3" / "s3.json", s["s3_access_key"], s["s3_secret_key"]
        )
        cmd = weed_command(c, self.data_dir, s3_conf)
        self._spawn("weed", cmd, processes.child_env(), self.data_dir / "s3")
        self._wait_until("weed", http_ok(f"{c.s3_endpoint}/healthz"), "S3 /healthz")
        self._wait_until(
            "weed",
            s3_accepts_keys(self.s3_endpoint, s["s3_access_key"], s["s3_secret_key"]),
            "signed S3 requests",
        )

    def _start_hypha(self) -> None:
        c = self.config
        extra = self._web_mount(c.hypha_extra_args) if c.web_page else c.hypha_extra_args
        cmd = hypha_command(c, self.data_dir, extra)
        self._spawn("hypha", cmd, hypha_env(self.secrets), self.data_dir / "hypha")
        self._wait_until("hypha", http_ok(f"{c.server_url}/health/readiness"), "/health/readiness")

    def _web_mount(self, extra_args: tuple[str, ...]) -> tuple[str, ...]:
        """Copy the web page into ``data_dir/web`` and add its ``--static-mounts``."""
        config = {
            "service_id": self.service_id,
            "collection": self.collection_id,
            "workspace": self.workspace,
        }
        args, url = web_mount(self.data_dir / "web", self.server_url, config, extra_args)
        if url is not None:
            self.page_url = url
        return args

    def _run_async(self, func: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine to completion from sync code, even inside a running loop."""
        result: dict[str, Any] = {}

        def runner() -> None:
            try:
                result["value"] = asyncio.run(
                    asyncio.wait_for(func(), timeout=self.config.startup_timeout)
                )
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=runner, name="stack-provision", daemon=True)
        thread.start()
        while thread.is_alive():  # short joins: a signal handler can still run
            thread.join(0.2)
        if "error" in result:
            raise result["error"]
        return result["value"]

    async def _provision(self) -> None:
        """Create the service workspace and the model collection if missing."""
        from hypha_rpc import connect_to_server

        c = self.config
        own = self.service_token(workspace=user_workspace(c.service_user), expires_in=600)
        # logger None: these short connections would print "Connection lost" on stdout
        quiet = {"logger": None}
        admin = await connect_to_server({"server_url": c.server_url, "token": own, **quiet})
        try:
            ws = await provision(
                admin,
                c.server_url,
                c.workspace,
                c.collection_alias,
                owner=c.service_user,
                workspace_token=self.service_token(expires_in=600),
                connect_options=quiet,
            )
            await ws.disconnect()
        finally:
            await admin.disconnect()

    # ------------------------------------------------------------------ connection file
    def connection_record(
        self, *, user: str | None = None, token: str | None = None, **more: Any
    ) -> dict[str, Any]:
        """This stack's ``connection.json`` content (:func:`.connection.connection_record`).

        Parameters
        ----------
        user : str, optional
            Whose token to include (default ``config.default_user``).
        token : str, optional
            The token to include; minted for ``user`` (30 days) if omitted.
        **more
            Other keys of the record (``service_id``, ``full_service_id``,
            ``backend``...); each defaults to what the stack knows.
        """
        user = user or self.config.default_user
        fields: dict[str, Any] = {
            "server_url": self.server_url,
            "workspace": self.workspace,
            "service_id": self.service_id,
            "collection": self.collection_id,
            "page_url": self.page_url,
            "s3_endpoint": self.s3_endpoint,
            "data_dir": self.data_dir,
            "started_at": self.started_at,
            **{k: v for k, v in more.items() if v is not None},
        }
        return _connection.connection_record(user=user, token=token or self.token(user), **fields)

    def write_connection_file(
        self,
        *,
        user: str | None = None,
        token: str | None = None,
        service_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``data_dir/connection.json`` (0600): how to reach this stack.

        Parameters
        ----------
        user, token : str, optional
            As for :meth:`connection_record`.
        service_id : str, optional
            Default ``<workspace>/cellpose-finetuning``.
        extra : dict, optional
            Other keys of :data:`.connection.CONNECTION_KEYS` (e.g.
            ``full_service_id`` after registering); no others.

        Returns
        -------
        Path
            The file; :meth:`stop` removes it.
        """
        record = self.connection_record(
            user=user, token=token, service_id=service_id, **(extra or {})
        )
        path = _connection.write_connection_file(self.data_dir, record)
        self._connection_written = True
        return path

    # ------------------------------------------------------------------ stop
    def stop(self, *, force: bool = False) -> None:
        """Stop Hypha, then SeaweedFS; remove the connection file. Idempotent.

        Safe from a signal handler and from another thread while ``start()``
        runs (the start then fails with :class:`StackError`). A call made
        while another is under way, or with ``force``, kills the remaining
        servers at once (SIGKILL, no grace period).
        """
        owner = not self._stopping
        quick = force or not owner
        self._stopping = True
        self._aborted = True
        try:
            for name, grace in (
                ("hypha", self.config.hypha_stop_timeout),
                ("weed", self.config.weed_stop_timeout),
            ):
                proc = self._procs.get(name)
                if proc is not None:
                    # weed's filer outwaits its grace (see StackConfig.weed_stop_timeout)
                    processes.terminate(
                        name, proc, 0.0 if quick else grace, kill_expected=name == "weed"
                    )
                    self._procs.pop(name, None)
        finally:
            if owner:
                self._stopping = False
                # only the holder of the lock owns the directory's files
                if not self._procs and self._lock is not None:
                    (self.data_dir / "stack.pids").unlink(missing_ok=True)
                    if self._connection_written:
                        _connection.remove_connection_file(self.data_dir)
                        self._connection_written = False
                    self._release_lock()
                    atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
