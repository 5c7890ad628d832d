"""A fair queue of training sessions run by worker processes, a few at a time.

Sessions wait as ``waiting`` with their queue position in the status message;
at most ``max_concurrent`` workers run at once. The queue is the local
executor; the Ray backend swaps it for Ray tasks while the API stays the same.

Fairness between users (owners of sessions):

* **Round robin.** A free slot goes to the waiting session of the owner with
  the fewest running sessions, ties broken by who was served longest ago; an
  owner's own sessions run in the order they were submitted.
* **Time slicing.** When an owner waits with fewer running sessions than
  another owner has, and one of that owner's runs has held its slot for at
  least ``time_slice_s``, the run is asked to pause at the end of its current
  epoch (its weights and optimizer state are saved); it is queued again and
  continues from there automatically. So a user flooding the queue with long
  runs delays another user's run by at most one epoch once the slice is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, deque
from typing import Any

from cellpose_finetuning.engine.schemas import TERMINAL_STATES
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import ResourceLimit

__all__ = ["SessionQueue"]

log = logging.getLogger(__name__)


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
    time_slice_s : float, optional
        Seconds a run keeps its slot before it pauses (at the end of an
        epoch) for another owner's waiting session; ``None``: never.
    """

    def __init__(
        self,
        max_concurrent: int = 1,
        max_queued: int | None = None,
        label: str = "training queue",
        *,
        time_slice_s: float | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.label = label
        self.time_slice_s = time_slice_s
        self.run_name = "training run"
        self._pending: deque[tuple[Session, bool]] = deque()
        self._running: dict[str, Session] = {}
        self._started: dict[str, float] = {}
        self._yielding: set[str] = set()
        self._last_turn: dict[str, int] = {}
        self._turns = itertools.count()
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

    # ------------------------------------------------------------------ fairness
    @staticmethod
    def _owner(session: Session) -> str:
        return str(session.owner or "")

    def _running_per_owner(self) -> Counter[str]:
        return Counter(self._owner(s) for s in self._running.values())

    def _next_index(
        self,
        pending: list[tuple[Session, bool]] | deque[tuple[Session, bool]],
        running: Counter[str],
        last_turn: dict[str, int],
    ) -> int:
        """Index in ``pending`` of the session to start next (round robin by owner)."""
        best, best_key = 0, None
        seen: set[str] = set()
        for i, (session, _) in enumerate(pending):
            owner = self._owner(session)
            if owner in seen:
                continue  # an owner's sessions run in submission order
            seen.add(owner)
            key = (running[owner], last_turn.get(owner, -1), i)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    def order(self) -> list[str]:
        """Ids of the waiting sessions in the order they would start."""
        pending = list(self._pending)
        running, last_turn = self._running_per_owner(), dict(self._last_turn)
        out: list[str] = []
        for turn in itertools.count(10**9):
            if not pending:
                break
            session, _ = pending.pop(self._next_index(pending, running, last_turn))
            running[self._owner(session)] += 1
            last_turn[self._owner(session)] = turn
            out.append(session.id)
        return out

    def _preempt(self) -> None:
        """Ask runs to pause for owners that wait with fewer running sessions."""
        if self.time_slice_s is None or not self._pending:
            return
        running = self._running_per_owner()
        for sid in self._yielding:  # those slots are being given back already
            if sid in self._running:
                running[self._owner(self._running[sid])] -= 1
        now = time.monotonic()
        candidates = [
            sid
            for sid in self._running
            if sid not in self._yielding and now - self._started.get(sid, now) >= self.time_slice_s
        ]
        free = self.max_concurrent - (len(self._running) - len(self._yielding))
        waiting = sorted(
            {self._owner(s) for s, _ in self._pending},
            key=lambda o: (running[o], self._last_turn.get(o, -1)),
        )
        for owner in waiting:
            if free > 0:  # a slot is (about to be) free for this owner anyway
                free -= 1
                running[owner] += 1
                continue
            if not candidates:
                return
            sid = max(
                candidates,
                key=lambda c: (running[self._owner(self._running[c])], -self._started[c]),
            )
            victim_owner = self._owner(self._running[sid])
            if running[victim_owner] <= running[owner]:
                continue
            self._yielding.add(sid)
            self._running[sid].request_yield()
            log.info("asked %s to pause at the end of its epoch for %s", sid, owner)
            candidates.remove(sid)
            running[victim_owner] -= 1
            running[owner] += 1

    # ------------------------------------------------------------------ internals
    def _update_positions(self) -> None:
        order = {sid: pos for pos, sid in enumerate(self.order(), start=1)}
        for session, _ in self._pending:
            with contextlib.suppress(Exception):
                session.update_status(
                    status_type="waiting",
                    message=f"Waiting in the {self.label}: position {order.get(session.id)} "
                    f"({len(self._running)} running)",
                )

    async def _dispatch(self) -> None:
        while True:
            if self.time_slice_s is not None and self._pending and self._running:
                # a run's slice may end without any event: look again in a second
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
            else:
                await self._wakeup.wait()
            self._wakeup.clear()
            self._preempt()
            while self._pending and len(self._running) < self.max_concurrent:
                i = self._next_index(self._pending, self._running_per_owner(), self._last_turn)
                session, resume = self._pending[i]
                del self._pending[i]
                self._last_turn[self._owner(session)] = next(self._turns)
                try:
                    handle = self._launch(session, resume)
                except Exception as exc:  # never let one session stop the queue
                    log.exception("could not start %s", session.id)
                    session.update_status(status_type="failed", message=f"Could not start: {exc}")
                    continue
                self._running[session.id] = session
                self._started[session.id] = time.monotonic()
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
            self._started.pop(session.id, None)
            if session.id in self._yielding:
                self._yielding.discard(session.id)
                session.clear_yield()
                with contextlib.suppress(Exception):
                    if session.read_status(reconcile=False).status_type == "waiting":
                        # paused: first among its owner's sessions, after other owners'
                        self._pending.appendleft((session, True))
            self._update_positions()
            self._wakeup.set()
