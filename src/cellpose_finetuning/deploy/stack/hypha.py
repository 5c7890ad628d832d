"""The Hypha server of the stack: its environment, its command line, the web page, readiness.

Hypha runs ``python -m hypha.server`` with its artifact manager on the
stack's S3 and a SQLite database in ``data_dir/hypha``. Secrets go through
the environment (readable by this user only), not the command line that
every local user sees in ``ps``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellpose_finetuning.deploy.stack.config import StackConfig
from cellpose_finetuning.deploy.stack.files import make_private
from cellpose_finetuning.deploy.stack.processes import child_env
from cellpose_finetuning.names import STACK_S3_BUCKET, STACK_S3_REGION

__all__ = ["http_ok", "hypha_command", "hypha_env", "web_mount"]

log = logging.getLogger(__name__)


def hypha_env(secrets: dict[str, str]) -> dict[str, str]:
    """Hypha's environment: the JWT secret and S3 keys as ``HYPHA_*`` (``--from-env``).

    Other ``HYPHA_*`` variables of the caller are dropped so they cannot
    change the server behind our back.
    """
    env = child_env(
        {
            "HYPHA_JWT_SECRET": secrets["jwt_secret"],
            "HYPHA_ACCESS_KEY_ID": secrets["s3_access_key"],
            "HYPHA_SECRET_ACCESS_KEY": secrets["s3_secret_key"],
        },
        drop_prefix="HYPHA_",
    )
    env.pop("JWT_SECRET", None)
    return env


def hypha_command(config: StackConfig, data_dir: Path, extra_args: tuple[str, ...]) -> list[str]:
    """The ``hypha.server`` command line for ``config`` on ``data_dir``."""
    c = config
    return [
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
        STACK_S3_REGION,
        "--workspace-bucket",
        STACK_S3_BUCKET,
        "--database-uri",
        f"sqlite+aiosqlite:///{data_dir / 'hypha' / 'hypha-app-database.db'}",
        *extra_args,
    ]


def web_mount(
    site_dir: Path, server_url: str, site_config: dict[str, Any], extra_args: tuple[str, ...]
) -> tuple[tuple[str, ...], str | None]:
    """Copy the web page into ``site_dir`` and add its ``--static-mounts``.

    Returns
    -------
    (arguments, page URL)
        ``extra_args`` with the mount, and where the page will be; on a
        failure (logged) ``extra_args`` unchanged and None.
    """
    from cellpose_finetuning.web import page_url, prepare_site, static_mount_args

    try:
        site = make_private(prepare_site(site_dir, site_config))
        args = static_mount_args(site, extra_args)
    except (OSError, ValueError) as exc:
        log.warning("the web page is not served: %s", exc)
        return extra_args, None
    return args, page_url(server_url)


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: whether ``url`` answers 200."""
    import httpx

    def ready() -> bool:
        try:
            with httpx.Client(trust_env=False, timeout=2) as client:
                return client.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    return ready
