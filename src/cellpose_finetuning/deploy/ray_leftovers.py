"""Ray processes a killed ``serve`` left running: recorded at start, stopped at the next.

A :class:`~cellpose_finetuning.deploy.ray_backend.RayBackend` that starts its
own Ray writes the processes of that instance (pid, start time, name) to
``ray.pids`` in the service's data directory and removes the file when it
stops. :func:`stop_ray_leftovers` reads a file left behind and stops those
processes and their children, never a process that merely reuses a pid.
Needs ``psutil`` only, not Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

__all__ = ["RAY_PIDS_FILE", "stop_ray_leftovers"]

log = logging.getLogger(__name__)

#: Where a backend that started its own Ray records Ray's processes (in the
#: service's data directory), so that the next start can stop what a killed
#: supervisor left running.
RAY_PIDS_FILE = "ray.pids"


def _process_record(proc: Any) -> dict[str, Any] | None:
    """``{"pid", "create_time", "name"}`` of a running ``psutil.Process``."""
    import psutil

    try:
        return {"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()}
    except psutil.Error:
        return None


def _recorded_processes(path: Path) -> list[Any]:
    """The processes listed in ``path`` that still run (same pid *and* start time)."""
    import psutil

    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    found = []
    for record in records if isinstance(records, list) else []:
        try:
            proc = psutil.Process(int(record["pid"]))
            if abs(proc.create_time() - float(record["create_time"])) < 0.01:
                found.append(proc)
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue  # gone, or the pid now belongs to another process
    return found


def _kill_processes(procs: list[Any], grace: float) -> int:
    """SIGTERM ``procs``, SIGKILL what is left after ``grace`` s; how many ran."""
    import psutil

    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, left = psutil.wait_procs(alive, timeout=grace)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
    return len(alive)


def stop_ray_leftovers(state_dir: str | os.PathLike[str], grace: float = 10.0) -> int:
    """Stop the local Ray a killed ``serve`` left running on ``state_dir``.

    :class:`RayBackend` records the processes of the Ray instance it starts
    (GCS, raylet, agents, with their start times) in ``state_dir/ray.pids``
    and removes the file when it stops. A file still there at the next start
    means its supervisor was killed (SIGKILL, OOM): those processes, and
    the workers under them, are stopped if they still run. A pid that now
    belongs to another process (different start time) is left alone.

    Returns
    -------
    int
        How many processes were stopped.
    """
    import psutil

    path = Path(state_dir) / RAY_PIDS_FILE
    if not path.exists():
        return 0
    roots = _recorded_processes(path)
    procs = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in root.children(recursive=True)})
    stopped = _kill_processes(list(procs.values()), grace) if procs else 0
    if stopped:
        log.warning("stopped %d Ray processes left running by an earlier serve", stopped)
    path.unlink(missing_ok=True)
    return stopped
