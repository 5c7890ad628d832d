"""A fair gate for calls that share a few slots (the service's ``infer``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter, deque
from typing import Any

from cellpose_finetuning.errors import ResourceLimit

__all__ = ["FairGate"]


class FairGate:
    """At most ``slots`` calls at once; waiting calls are served fairly between users.

    A freed slot goes to the waiting call of the user with the fewest calls
    running, ties broken by who was served longest ago, so one user's burst of
    large calls delays another user's call by at most the one running when it
    arrived (with one slot). Each user may have ``max_waiting_per_user`` calls
    waiting; more are refused at once.

    Parameters
    ----------
    slots : int
        Calls running at once.
    max_waiting_per_user : int, optional
        Calls one user may have waiting (no limit by default).
    label : str
        How errors name what is limited.
    """

    def __init__(
        self, slots: int = 1, max_waiting_per_user: int | None = None, label: str = "infer"
    ) -> None:
        self.slots = slots
        self.max_waiting_per_user = max_waiting_per_user
        self.label = label
        self._active: Counter[str] = Counter()
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._last_served: dict[str, int] = {}
        self._turns = itertools.count()

    @property
    def active(self) -> int:
        """Calls running now."""
        return sum(self._active.values())

    def waiting(self, user: str | None = None) -> int:
        """Calls waiting (of ``user``, or of everyone)."""
        if user is not None:
            return len(self._waiters.get(user, ()))
        return sum(len(q) for q in self._waiters.values())

    def _take(self, user: str) -> None:
        self._active[user] += 1
        self._last_served[user] = next(self._turns)

    def _grant(self) -> None:
        while self.active < self.slots and self._waiters:
            user = min(self._waiters, key=lambda u: (self._active[u], self._last_served.get(u, -1)))
            queue = self._waiters[user]
            fut = queue.popleft()
            if not queue:
                del self._waiters[user]
            if fut.done():  # cancelled while waiting
                continue
            self._take(user)
            fut.set_result(None)

    def _release(self, user: str) -> None:
        self._active[user] -= 1
        if self._active[user] <= 0:
            del self._active[user]
        self._grant()

    @contextlib.asynccontextmanager
    async def slot(self, user: str) -> Any:
        """Wait for a slot for ``user``'s call; hold it inside the ``async with``.

        Raises
        ------
        ResourceLimit
            When ``user`` already has ``max_waiting_per_user`` calls waiting.
        """
        if self.active < self.slots and not self._waiters:
            self._take(user)
        else:
            queue = self._waiters.get(user)
            limit = self.max_waiting_per_user
            if limit is not None and queue is not None and len(queue) >= limit:
                raise ResourceLimit(
                    f"{self.label}: you already have {len(queue)} calls waiting "
                    f"(limit {limit}); wait for them to finish"
                )
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(user, deque()).append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release(user)  # granted just as we were cancelled
                else:
                    fut.cancel()
                    queue = self._waiters.get(user)
                    if queue is not None and fut in queue:
                        queue.remove(fut)
                        if not queue:
                            del self._waiters[user]
                raise
        try:
            yield
        finally:
            self._release(user)
