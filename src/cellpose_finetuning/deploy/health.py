"""Is the service up? One check per part, for a supervisor or a container probe.

``cellpose-finetuning health`` reads ``connection.json`` (written by
``serve`` while it runs) and asks each part in turn, with a timeout each:

- ``serve``: the supervising process (its pid) still runs;
- ``hypha``: the Hypha server's ``/health/readiness`` answers 200;
- ``s3``: SeaweedFS's S3 ``/healthz`` answers 200 (embedded stack only;
  with ``--server-url`` S3 is the server's business and is not checked);
- ``service``: an anonymous client finds the registered service and a call
  (``list_pretrained_models``) returns.

The report is JSON; the overall ``ok`` is true only when every checked part
is. Checks are independent: a dead SeaweedFS shows as ``s3`` down while
Hypha and the service are still reported up.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from cellpose_finetuning.deploy.stack import StackError, read_connection_file

__all__ = ["check_health"]


def _pid_running(pid: Any) -> bool:
    """Whether ``pid`` runs on this machine (a zombie does not)."""
    import psutil

    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


async def _http_check(url: str, timeout: float) -> dict[str, Any]:
    import httpx

    t0 = time.monotonic()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return {"ok": False, "url": url, "error": f"{type(exc).__name__}: {exc}".rstrip(": ")}
    ok = response.status_code == 200
    report: dict[str, Any] = {
        "ok": ok,
        "url": url,
        "status_code": response.status_code,
        "seconds": round(time.monotonic() - t0, 3),
    }
    if not ok:
        report["error"] = response.text[:200]
    return report


async def _service_check(server_url: str, service_id: str, timeout: float) -> dict[str, Any]:
    from hypha_rpc import connect_to_server

    t0 = time.monotonic()
    server = None
    try:
        async with asyncio.timeout(timeout):
            # logger None: a failed check must not print reconnection chatter
            server = await connect_to_server({"server_url": server_url, "logger": None})
            service = await server.get_service(service_id)
            models = await service.list_pretrained_models()
    except Exception as exc:  # any failure is the answer
        reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return {"ok": False, "service_id": service_id, "error": reason[:300]}
    finally:
        if server is not None:
            try:
                async with asyncio.timeout(5):
                    await server.disconnect()
            except Exception:  # closing is best effort
                pass
    return {
        "ok": True,
        "service_id": service_id,
        "models": len(models),
        "seconds": round(time.monotonic() - t0, 3),
    }


async def check_health(data_dir: str | os.PathLike[str], timeout: float = 10.0) -> dict[str, Any]:
    """Check each part of a running ``serve`` on ``data_dir``.

    Parameters
    ----------
    data_dir : path
        The ``--data-dir`` of ``serve``.
    timeout : float
        Seconds each check may take.

    Returns
    -------
    dict
        ``ok`` (every checked part answers), ``checked_at``, and under
        ``parts`` one entry per part with its own ``ok`` (``None`` for a part
        that is not checked) and, when down, an ``error``. When nothing serves
        from ``data_dir`` (no ``connection.json``), ``ok`` is false and
        ``error`` says so.
    """
    report: dict[str, Any] = {
        "ok": False,
        "data_dir": str(Path(data_dir).expanduser()),
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        conn = read_connection_file(data_dir)
    except (StackError, ValueError, OSError) as exc:
        report["error"] = str(exc)
        return report
    server_url = conn["server_url"]
    s3 = conn.get("s3_endpoint")
    hypha, s3_report, service = await asyncio.gather(
        _http_check(f"{server_url}/health/readiness", timeout),
        _http_check(f"{s3}/healthz", timeout) if s3 else _not_checked("S3 of --server-url"),
        _service_check(server_url, conn["service_id"], timeout),
    )
    parts = {
        "serve": {"ok": _pid_running(conn.get("pid")), "pid": conn.get("pid")},
        "hypha": hypha,
        "s3": s3_report,
        "service": service,
    }
    report["backend"] = conn.get("backend")
    report["parts"] = parts
    report["ok"] = all(part["ok"] is not False for part in parts.values())
    return report


async def _not_checked(what: str) -> dict[str, Any]:
    return {"ok": None, "detail": f"not checked: {what}"}
