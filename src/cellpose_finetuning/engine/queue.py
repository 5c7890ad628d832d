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
from typing import Any, Protocol

from cellpose_finetuning.engine.schemas import TERMINAL_STATES
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.engine.training import TrainingWorker, start_worker
from cellpose_finetuning.errors import ResourceLimit

__all__ = ["SessionQueue", "TrainingExecutor", "TrainingQueue"]

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


class SessionQueue:
    """A bounded queue of sessions, run a few at a time by a subclass's launcher.

    Subclasses say how a run starts (:meth:`_launch`, returning a handle)
    and how to wait for it (:meth:`_join`); the queue keeps positions in
    the status messages, limits concurrency and the number of waiting
    sessions, and marks a session ``failed`` when its run dies without
    saying so (:meth:`_on_crash`).

    Parameters
    ----------
    max_concurrent : int
        Runs at once.
    max_queued : int, optional
        Sessions that may wait; ``submit`` refuses more (no limit by default).
    label : str
        How the status messages name the queue.
    """

    def __init__(
        self, max_concurrent: int = 1, max_queued: int | None = None, label: str = "training queue"
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.label = label
        self.run_name = "training run"
        self._pending: deque[tuple[Session, bool]] = deque()
        self._running: dict[str, Session] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ subclass hooks
    def _launch(self, session: Session, resume: bool) -> Any:
        """Start the session's run; return a handle for :meth:`_join`."""
        raise NotImplementedError

    async def _join(self, handle: Any) -> None:
        """Wait until the run behind ``handle`` has ended."""
        raise NotImplementedError

    def _cause(self, exc: BaseException) -> BaseException:
        """The error to name when a run crashed (subclasses unwrap their framework's)."""
        return exc

    def _on_crash(self, session: Session, exc: BaseException) -> None:
        """The run raised instead of ending: record it unless it already did."""
        status = session.read_status(reconcile=False)
        if status.status_type not in TERMINAL_STATES:
            session.update_status(
                status_type="failed",
                message=f"The {self.run_name} ended unexpectedly during epoch "
                f"{(status.current_epoch or 0) + 1} ({type(self._cause(exc)).__name__}). "
                "Weights of the last saved checkpoint are kept; continue the session to "
                "train further.",
                worker_pid=None,
            )

    # ------------------------------------------------------------------ executor API
    def start(self) -> None:
        """Start dispatching (call from a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def close(self, timeout: float = 60) -> None:
        """Stop dispatching; running sessions are asked to stop and waited for."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for session in list(self._running.values()):
            session.request_stop()
        if self._watchers:
            await asyncio.wait(list(self._watchers.values()), timeout=timeout)

    def submit(self, session: Session, *, resume: bool = False) -> None:
        """Queue a session (in state ``waiting``); refuse it when the queue is full."""
        if self.max_queued is not None and len(self._pending) >= self.max_queued:
            session.update_status(
                status_type="failed", message=f"Refused: the {self.label} is full"
            )
            raise ResourceLimit(
                f"the {self.label} is full ({self.max_queued} sessions wait); try later"
            )
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
        """Whether the session is training now."""
        return session_id in self._running

    def is_queued(self, session_id: str) -> bool:
        """Whether the session waits in the queue."""
        return any(s.id == session_id for s, _ in self._pending)

    @property
    def running(self) -> list[str]:
        """Ids of running sessions."""
        return list(self._running)

    # ------------------------------------------------------------------ internals
    def _update_positions(self) -> None:
        for pos, (session, _) in enumerate(self._pending, start=1):
            with contextlib.suppress(Exception):
                session.update_status(
                    status_type="waiting",
                    message=f"Waiting in the {self.label}: position {pos} "
                    f"({len(self._running)} running)",
                )

    async def _dispatch(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and len(self._running) < self.max_concurrent:
                session, resume = self._pending.popleft()
                try:
                    handle = self._launch(session, resume)
                except Exception as exc:  # never let one session stop the queue
                    log.exception("could not start %s", session.id)
                    session.update_status(status_type="failed", message=f"Could not start: {exc}")
                    continue
                self._running[session.id] = session
                self._watchers[session.id] = asyncio.get_running_loop().create_task(
                    self._watch(session, handle)
                )
                self._update_positions()

    async def _watch(self, session: Session, handle: Any) -> None:
        try:
            await self._join(handle)
        except Exception as exc:
            self._on_crash(session, exc)
        finally:
            self._running.pop(session.id, None)
            self._watchers.pop(session.id, None)
            self._update_positions()
            self._wakeup.set()


class TrainingQueue(SessionQueue):
    """Run queued sessions in local worker processes.

    Parameters
    ----------
    max_concurrent : int
        Trainings that may run at once (one per GPU is sensible).
    num_threads : int, optional
        Torch CPU threads per worker.
    """

    def __init__(self, max_concurrent: int = 1, num_threads: int | None = None) -> None:
        super().__init__(max_concurrent)
        self.num_threads = num_threads

    def _launch(self, session: Session, resume: bool) -> TrainingWorker:
        return start_worker(session, resume=resume, num_threads=self.num_threads)

    async def _join(self, handle: TrainingWorker) -> None:
        # A worker that dies without a final status is reconciled by read_status.
        await asyncio.to_thread(handle.wait)
