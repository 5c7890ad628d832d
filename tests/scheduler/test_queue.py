"""The session queue's rules without training: fair order, positions, caps, crashes, slices.

Runs here are asyncio events the test ends when it wants (only the launcher
differs from the service's queue); the sessions are real session folders.
``test_fairness.py`` checks the same queue with real cellpose runs.
"""

from __future__ import annotations

import asyncio

import pytest

from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.engine.sessions import DataSpec, Session, SessionStore
from cellpose_finetuning.errors import ResourceLimit
from cellpose_finetuning.scheduler import SessionQueue


class EventQueue(SessionQueue):
    """A queue whose runs last until the test sets their event (or makes them crash)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.launched: list[str] = []
        self.runs: dict[str, asyncio.Event] = {}
        self.crash: set[str] = set()

    def _launch(self, session: Session, resume: bool) -> str:
        self.launched.append(session.id)
        self.runs[session.id] = asyncio.Event()
        return session.id

    async def _join(self, handle: str) -> None:
        await self.runs[handle].wait()
        if handle in self.crash:
            raise RuntimeError("worker died")

    def finish(self, session_id: str) -> None:
        self.runs[session_id].set()


async def _until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
def store(tmp_path) -> SessionStore:
    return SessionStore(tmp_path)


def _new(store: SessionStore, owner: str, n: int) -> Session:
    data = DataSpec(train=[("image.tif", "mask.tif")])
    return store.create(TrainingSettings(), data, owner=owner, session_id=f"{owner}-{n}")


def test_order_is_round_robin_by_owner_and_submission_order_within_an_owner(store):
    queue = EventQueue(max_concurrent=1)
    for owner, n in [("alice", 1), ("alice", 2), ("alice", 3), ("bob", 1), ("carol", 1)]:
        queue.submit(_new(store, owner, n))
    assert queue.order() == ["alice-1", "bob-1", "carol-1", "alice-2", "alice-3"]
    assert queue.is_queued("carol-1") and not queue.is_running("carol-1")


def test_waiting_sessions_show_their_position_in_the_fair_order(store):
    queue = EventQueue(max_concurrent=1, label="test queue")
    a1, a2, b1 = _new(store, "alice", 1), _new(store, "alice", 2), _new(store, "bob", 1)
    for session in (a1, a2, b1):
        queue.submit(session)
    assert [s.read_status().message for s in (a1, b1, a2)] == [
        f"Waiting in the test queue: position {n} (0 running)" for n in (1, 2, 3)
    ]
    assert {s.read_status().status_type for s in (a1, a2, b1)} == {"waiting"}


def test_a_full_queue_refuses_the_session_and_marks_it_failed(store):
    queue = EventQueue(max_concurrent=1, max_queued=2)
    queue.submit(_new(store, "alice", 1))
    queue.submit(_new(store, "alice", 2))
    third = _new(store, "bob", 1)
    with pytest.raises(ResourceLimit, match="full"):
        queue.submit(third)
    assert third.read_status().status_type == "failed"
    assert not queue.is_queued(third.id)


def test_cancel_drops_a_waiting_session_and_renumbers_the_others(store):
    queue = EventQueue(max_concurrent=1)
    a1, b1 = _new(store, "alice", 1), _new(store, "bob", 1)
    queue.submit(a1)
    queue.submit(b1)
    assert queue.cancel(a1.id) is True
    assert queue.cancel(a1.id) is False
    assert queue.order() == [b1.id]
    assert "position 1" in b1.read_status().message


async def test_at_most_max_concurrent_run_and_a_free_slot_goes_to_the_next_owner(store):
    queue = EventQueue(max_concurrent=2)
    sessions = [_new(store, "alice", n) for n in (1, 2, 3)] + [_new(store, "bob", 1)]
    queue.start()
    try:
        for session in sessions:
            queue.submit(session)
        await _until(lambda: len(queue.launched) == 2)
        assert queue.launched == ["alice-1", "bob-1"]
        assert sorted(queue.running) == ["alice-1", "bob-1"]
        queue.finish("bob-1")
        await _until(lambda: len(queue.launched) == 3)
        assert queue.launched[2] == "alice-2" and len(queue.running) == 2
        assert "position 1 (2 running)" in sessions[2].read_status().message
    finally:
        for run in queue.runs.values():
            run.set()
        await queue.close(timeout=10)


async def test_a_run_that_dies_without_a_final_status_leaves_the_session_failed(store):
    queue = EventQueue(max_concurrent=1)
    session = _new(store, "alice", 1)
    queue.crash.add(session.id)
    queue.start()
    try:
        queue.submit(session)
        await _until(lambda: queue.is_running(session.id))
        queue.finish(session.id)
        await _until(lambda: session.read_status().status_type == "failed")
        assert "ended unexpectedly" in session.read_status().message
        assert not queue.is_running(session.id)
    finally:
        await queue.close(timeout=10)


async def test_a_run_past_its_time_slice_is_asked_to_yield_to_another_owner(store):
    queue = EventQueue(max_concurrent=1, time_slice_s=0)
    mallory, mallory2, bob = (
        _new(store, "mallory", 1),
        _new(store, "mallory", 2),
        _new(store, "bob", 1),
    )
    queue.start()
    try:
        queue.submit(mallory)
        await _until(lambda: queue.is_running(mallory.id))
        queue.submit(mallory2)
        queue._preempt()  # what the dispatcher does on each wake-up
        assert not mallory.yield_requested  # only another owner's session preempts
        queue.submit(bob)
        await _until(lambda: mallory.yield_requested)
        # the run pauses (a real worker writes "waiting" and returns) ...
        mallory.update_status(status_type="waiting", message="paused")
        queue.finish(mallory.id)
        await _until(lambda: queue.is_running(bob.id))
        # ... and is first among mallory's sessions again, after bob's
        assert not mallory.yield_requested
        assert queue.order() == [mallory.id, mallory2.id]
    finally:
        for run in queue.runs.values():
            run.set()
        await queue.close(timeout=10)


async def test_without_a_time_slice_no_run_is_preempted(store):
    queue = EventQueue(max_concurrent=1)
    mallory, bob = _new(store, "mallory", 1), _new(store, "bob", 1)
    queue.start()
    try:
        queue.submit(mallory)
        await _until(lambda: queue.is_running(mallory.id))
        queue.submit(bob)
        queue._preempt()  # what the dispatcher does on each wake-up
        assert not mallory.yield_requested and queue.order() == [bob.id]
    finally:
        queue.finish(mallory.id)
        await queue.close(timeout=10)
