"""The service's web page: static files served by the embedded stack's Hypha server.

The page (``static/``) is plain HTML, CSS and ES modules with every script it
needs vendored under ``static/vendor/`` (no CDN, no build step). At each start
the stack copies it into ``<data_dir>/web/`` together with a ``config.json``
naming the service and the default model collection, and mounts that folder on
Hypha with ``--static-mounts`` at :data:`PAGE_MOUNT`. The page takes the server
URL from its own address and the service id from ``config.json`` (a
``?service=`` query parameter overrides it), so nothing about the deployment is
hard-coded in it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["PAGE_MOUNT", "page_url", "prepare_site", "static_dir", "static_mount_args"]

#: Where Hypha serves the page. An underscore can never be in a workspace name,
#: so this cannot hide a workspace's ``/<workspace>/...`` routes.
PAGE_MOUNT = "/cellpose_finetuning"


def static_dir() -> Path:
    """The page's files inside the installed package."""
    return Path(__file__).parent / "static"


def page_url(server_url: str) -> str:
    """The page's address on a server that mounts it at :data:`PAGE_MOUNT`."""
    return f"{server_url.rstrip('/')}{PAGE_MOUNT}/index.html"


def prepare_site(target: Path, config: dict[str, Any]) -> Path:
    """Copy the page into ``target`` (replacing what was there) and write ``config.json``.

    Parameters
    ----------
    target : Path
        The folder Hypha will serve, e.g. ``<data_dir>/web``.
    config : dict
        What the page reads at start: ``service_id``, ``collection``...

    Returns
    -------
    Path
        ``target``, resolved.
    """
    target = Path(target).resolve()
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(static_dir(), target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target


def static_mount_args(site: Path, extra_args: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Hypha arguments that mount ``site`` at :data:`PAGE_MOUNT`, merged into ``extra_args``.

    ``--static-mounts`` takes a list and the last occurrence wins, so a mount
    already in ``extra_args`` gets ours added to its list instead of a second
    flag.

    Raises
    ------
    ValueError
        If ``site`` contains ``:`` (Hypha splits the mount at ``:``).
    """
    if ":" in str(site):
        raise ValueError(f"{site}: Hypha cannot mount a folder whose path contains ':'")
    mount = f"{PAGE_MOUNT}:{site}"
    args = list(extra_args)
    if "--static-mounts" in args:
        args.insert(args.index("--static-mounts") + 1, mount)
        return tuple(args)
    return ("--static-mounts", mount, *args)
