"""``connection.json``: how to reach what serves from a data directory, one writer, one set of keys.

``serve`` (on the embedded stack or on a server) and the embedded stack alone
write it through :func:`write_connection_file`, with the keys of
:func:`connection_record`; ``health``, ``remote --data-dir`` and the tests
read it with :func:`read_connection_file`. It holds a token: mode 0600.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellpose_finetuning.deploy.stack.config import StackError
from cellpose_finetuning.deploy.stack.files import write_private

__all__ = [
    "CONNECTION_FILE",
    "CONNECTION_KEYS",
    "connection_record",
    "read_connection_file",
    "remove_connection_file",
    "write_connection_file",
]

CONNECTION_FILE = "connection.json"
#: Every key the file has, always (None where it does not apply).
CONNECTION_KEYS = (
    "server_url",
    "workspace",
    "service_id",
    "full_service_id",
    "collection",
    "page_url",
    "s3_endpoint",
    "user",
    "token",
    "data_dir",
    "pid",
    "backend",
    "started_at",
)


def connection_record(
    *,
    server_url: str,
    workspace: str,
    service_id: str,
    data_dir: str | os.PathLike[str],
    full_service_id: str | None = None,
    collection: str | None = None,
    page_url: str | None = None,
    s3_endpoint: str | None = None,
    user: str | None = None,
    token: str | None = None,
    pid: int | None = None,
    backend: str | None = None,
    started_at: datetime | str | None = None,
) -> dict[str, Any]:
    """The content of ``connection.json``: every key of :data:`CONNECTION_KEYS`.

    Parameters
    ----------
    server_url, workspace, service_id : str
        Where the service is (``service_id`` is ``<workspace>/<id>``).
    data_dir : path
        The data directory it serves from.
    full_service_id : str, optional
        The id Hypha gave the registration (with its client id).
    collection : str, optional
        The default model collection, ``<workspace>/<alias>``.
    page_url, s3_endpoint : str, optional
        The web page and S3 (embedded stack only).
    user, token : str, optional
        A user's token to connect with (embedded stack only).
    pid : int, optional
        The serving process (default: this one).
    backend : str, optional
        ``local`` or ``ray``.
    started_at : datetime or str, optional
        Default: now.
    """
    if isinstance(started_at, datetime):
        started_at = started_at.isoformat()
    return {
        "server_url": server_url,
        "workspace": workspace,
        "service_id": service_id,
        "full_service_id": full_service_id,
        "collection": collection,
        "page_url": page_url,
        "s3_endpoint": s3_endpoint,
        "user": user if token else None,
        "token": token,
        "data_dir": str(data_dir),
        "pid": os.getpid() if pid is None else pid,
        "backend": backend,
        "started_at": started_at or datetime.now(UTC).isoformat(),
    }


def write_connection_file(data_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``record`` (from :func:`connection_record`) to ``data_dir/connection.json``, 0600.

    Raises
    ------
    ValueError
        If ``record`` does not have exactly the keys of :data:`CONNECTION_KEYS`.
    """
    if set(record) != set(CONNECTION_KEYS):
        odd = sorted(set(record) ^ set(CONNECTION_KEYS))
        raise ValueError(f"connection.json: not the keys of connection_record(): {odd}")
    path = Path(data_dir) / CONNECTION_FILE
    write_private(path, json.dumps(record, indent=1))
    return path


def read_connection_file(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``connection.json`` written by a running stack or ``serve``.

    Raises
    ------
    StackError
        If there is none (nothing is serving from ``data_dir``).
    """
    path = Path(data_dir).expanduser() / CONNECTION_FILE
    if not path.is_file():
        raise StackError(f"no {path}; is 'cellpose-finetuning serve' running with this --data-dir?")
    return json.loads(path.read_text())


def remove_connection_file(data_dir: str | os.PathLike[str]) -> None:
    """Remove ``data_dir/connection.json`` if it is there."""
    (Path(data_dir) / CONNECTION_FILE).unlink(missing_ok=True)
