"""The embedded stack's settings: ports, names, folders, and their checks.

Pure: nothing here starts a process or opens a connection, so ``serve
--server-url`` and the CLI can validate a configuration (and a port plan)
without the ``server`` extra.
"""

from __future__ import annotations

import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cellpose_finetuning.errors import CellposeFinetuningError, InvalidInput
from cellpose_finetuning.names import (
    DEFAULT_COLLECTION_ALIAS,
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_HYPHA_PORT,
    DEFAULT_S3_PORT,
    DEFAULT_USER,
    DEFAULT_WORKSPACE,
    SERVICE_USER,
    WEED_FILER_PORT,
    WEED_MASTER_PORT,
    WEED_VOLUME_PORT,
)

__all__ = [
    "GRPC_OFFSET",
    "StackConfig",
    "StackError",
    "check_platform",
    "port_is_free",
]

#: SeaweedFS serves gRPC on each HTTP port + 10000.
GRPC_OFFSET = 10000
# Hypha's rules: lowercase letters, digits and hyphens, at least one hyphen
# unless created by its root user.
WORKSPACE_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]+$")
USER_RE = re.compile(r"^[A-Za-z0-9_.@|-]+$")
_PORT_FIELDS = ("hypha_port", "s3_port", "weed_master_port", "weed_volume_port", "weed_filer_port")


class StackError(CellposeFinetuningError):
    """The embedded stack could not start or stop (busy port, a child died...)."""


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


def port_is_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether a TCP port can be bound on ``host`` (what each server will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: a port in TIME_WAIT after a restart is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class StackConfig:
    """Ports, names and folders of the embedded stack.

    Every port must be free on ``host``, and so must each SeaweedFS port +
    10000 (its gRPC side). Two stacks on one machine need different
    ``data_dir`` and different ports.

    Parameters
    ----------
    data_dir : Path
        Everything the stack keeps (see :mod:`cellpose_finetuning.deploy.stack`).
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
        Seconds after SIGTERM before SIGKILL. SeaweedFS's filer waits a
        hard-coded 15 s on SIGTERM for its own S3 gateway's metadata
        subscription, which never ends; weed stops after Hypha, its only
        client, so nothing is in flight and every write is already in the
        volume files and the filer's journal: a kill after 3 s loses nothing
        (``tests/deploy/test_stack.py`` restarts on the same data).
    weed_extra_args, hypha_extra_args : tuple of str
        Appended to each command line (e.g. ``("-volume.max=64",)``).
    web_page : bool
        Serve the web page (:mod:`cellpose_finetuning.web`) at ``/cellpose_finetuning/``.
    """

    data_dir: Path = field(default_factory=lambda: DEFAULT_DATA_DIR)
    host: str = DEFAULT_HOST
    hypha_port: int = DEFAULT_HYPHA_PORT
    s3_port: int = DEFAULT_S3_PORT
    weed_master_port: int = WEED_MASTER_PORT
    weed_volume_port: int = WEED_VOLUME_PORT
    weed_filer_port: int = WEED_FILER_PORT
    workspace: str = DEFAULT_WORKSPACE
    collection_alias: str = DEFAULT_COLLECTION_ALIAS
    service_user: str = SERVICE_USER
    default_user: str = DEFAULT_USER
    jwt_secret: str | None = field(default=None, repr=False)
    startup_timeout: float = 90.0
    hypha_stop_timeout: float = 10.0
    weed_stop_timeout: float = 3.0
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
        if not WORKSPACE_RE.match(self.workspace or ""):
            problems.append(
                InvalidInput(
                    "workspace",
                    f"{self.workspace!r}: lowercase letters, digits and at least one hyphen",
                )
            )
        if not ALIAS_RE.match(self.collection_alias or ""):
            problems.append(
                InvalidInput(
                    "collection_alias", f"{self.collection_alias!r}: letters, digits, -, _"
                )
            )
        for name in ("service_user", "default_user"):
            if not USER_RE.match(getattr(self, name) or ""):
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
