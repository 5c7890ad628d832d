"""A queue of training sessions run by worker processes, a few at a time.

Sessions wait as ``waiting`` with their queue position in the status message;
at most ``max_concurrent`` workers run at once. The queue is the local
executor; the Ray backend swaps it for Ray tasks while the API stays the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.engine.training import TrainingWorker, start_worker

__all__ = ["TrainingExecutor", "TrainingQueue"]

log = logging.getLogger(__name__)


class TrainingExecutor(Protocol):
    """Where training sessions run: local worker processes or Ray tasks.

    The service only talks to this interface, so the API is the same object
    whatever runs the training.
    """

    def start(self) -> None:
        """Start dispatching (from a running event loop)."""
        ...

    async def close(self) -> None:
        """Stop dispatching; ask running sessions to stop."""
        ...

    def submit(self, session: Session, *, resume: bool = False) -> None:
        """Queue a session (in state ``waiting``)."""
        ...

    def cancel(self, session_id: str) -> bool:
        """Drop a queued session; True if it was queued."""
        ...

    def is_running(self, session_id: str) -> bool:
        """Whether the session is training now."""
        ...

    def is_queued(self, session_id: str) -> bool:
        """Whether the session waits in the queue."""
        ...


class TrainingQueue:
    """Run queued sessions in worker processes.

    Parameters
    ----------
    max_concurrent : int
        Trainings that may run at once (one per GPU is sensible).
    num_threads : int, optional
        Torch CPU threads per worker.
    """

    def __init__(self, max_concurrent: int = 1, num_threads: int | None = None) -> None:
        self.max_concurrent = max_concurrent
        self.num_threads = num_threads
        self._pending: deque[tuple[Session, bool]] = deque()
        self._running: dict[str, TrainingWorker] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._done_callbacks: list[Callable[[Session], Awaitable[None] | None]] = []

    def start(self) -> None:
        """Start dispatching (call from a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def close(self) -> None:
        """Stop dispatching. Running workers are asked to stop and waited for."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for worker in list(self._running.values()):
            worker.session.request_stop()
        for worker in list(self._running.values()):
            await asyncio.to_thread(worker.wait, 60)

    def submit(self, session: Session, *, resume: bool = False) -> None:
        """Queue a session (in state ``waiting``)."""
        self._pending.append((session, resume))
        self._update_positions()
        self._wakeup.set()

    def cancel(self, session_id: str) -> bool:
        """Remove a waiting session from the queue; True if it was queued."""
        for item in list(self._pending):
            if item[0].id == session_id:
                self._pending.remove(item)
                self._update_positions()
                return True
        return False

    def is_running(self, session_id: str) -> bool:
        """Whether a worker currently runs this session."""
        return session_id in self._running

    def is_queued(self, session_id: str) -> bool:
        """Whether the session waits in the queue."""
        return any(s.id == session_id for s, _ in self._pending)

    @property
    def running(self) -> list[str]:
        """Ids of running sessions."""
        return list(self._running)

    def _update_positions(self) -> None:
        for pos, (session, _) in enumerate(self._pending, start=1):
            with contextlib.suppress(Exception):
                session.update_status(
                    status_type="waiting",
                    message=f"Waiting in the training queue: position {pos} "
                    f"({len(self._running)} running)",
                )

    async def _dispatch(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and len(self._running) < self.max_concurrent:
                session, resume = self._pending.popleft()
                try:
                    worker = start_worker(session, resume=resume, num_threads=self.num_threads)
                except Exception as exc:  # never let one session stop the queue
                    log.exception("could not start %s", session.id)
                    session.update_status(status_type="failed", message=f"Could not start: {exc}")
                    continue
                self._running[session.id] = worker
                asyncio.get_running_loop().create_task(self._watch(worker))
                self._update_positions()

    async def _watch(self, worker: TrainingWorker) -> None:
        try:
            await asyncio.to_thread(worker.wait)
        finally:
            self._running.pop(worker.session.id, None)
            self._update_positions()
            self._wakeup.set()
