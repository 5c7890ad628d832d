"""Fair scheduling between users: the training queue and infer's gate.

The attack: ``mallory`` floods the service (long trainings, many large
``infer`` calls); ``bob``'s short work must still get its turn quickly.
Trainings here are real cellpose runs of the tiny network (in threads, to
spare the worker start-up); only the launcher differs from the service's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cellpose_finetuning.engine.runs import create_local_session
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.engine.training import run_training
from cellpose_finetuning.errors import ResourceLimit
from cellpose_finetuning.scheduler import FairGate, SessionQueue


async def _until(predicate, timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- infer's gate
async def test_one_users_burst_delays_anothers_call_by_at_most_the_running_one():
    gate = FairGate(slots=1, max_waiting_per_user=5)
    release: dict[str, asyncio.Event] = {}
    order: list[str] = []

    async def call(user: str, name: str) -> None:
        release[name] = asyncio.Event()
        async with gate.slot(user):
            order.append(name)
            await release[name].wait()

    tasks = [asyncio.create_task(call("mallory", f"m{i}")) for i in range(6)]
    await _until(lambda: gate.waiting("mallory") == 5)
    with pytest.raises(ResourceLimit, match="5 calls waiting"):
        await call("mallory", "m6")  # a sixth waiting call is one too many
    tasks.append(asyncio.create_task(call("bob", "b0")))
    await _until(lambda: gate.waiting("bob") == 1)
    for _ in range(len(tasks)):
        n = len(order)
        release[order[-1]].set()
        if n < len(tasks):
            await _until(lambda n=n: len(order) > n)
    await asyncio.gather(*tasks)
    assert order[:2] == ["m0", "b0"], order  # bob waited for one large call only
    assert order[2:] == [f"m{i}" for i in range(1, 6)]
    assert gate.active == 0 and gate.waiting() == 0


async def test_a_cancelled_waiting_call_gives_its_turn_away():
    gate = FairGate(slots=1)
    hold = asyncio.Event()
    got: list[str] = []

    async def call(user: str) -> None:
        async with gate.slot(user):
            got.append(user)
            if user == "mallory":
                await hold.wait()

    first = asyncio.create_task(call("mallory"))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(call("bob"))
    later = asyncio.create_task(call("carol"))
    await _until(lambda: gate.waiting() == 2)
    cancelled.cancel()
    hold.set()
    await asyncio.gather(first, later)
    assert got == ["mallory", "carol"] and gate.active == 0


# ----------------------------------------------------------------------------- training queue
class ThreadQueue(SessionQueue):
    """The service's queue, running cellpose's training in a thread per session."""

    def _launch(self, session: Session, resume: bool) -> asyncio.Task:
        self.launches.append((session.id, resume))
        return asyncio.ensure_future(asyncio.to_thread(run_training, session, resume=resume))

    async def _join(self, handle: asyncio.Task) -> None:
        await handle


def _session(root: Path, name: str, owner: str, pairs, tiny_model, n_epochs: int) -> Session:
    return create_local_session(
        out=root / name,
        train_pairs=pairs,
        settings={"model": str(tiny_model), "n_epochs": n_epochs, "batch_size": 2},
        owner=owner,
    )


async def test_a_flooding_user_yields_after_an_epoch_and_continues_where_it_was(
    tmp_path, tiny_model, train_pairs
):
    pairs = train_pairs[:2]
    long_a = _session(tmp_path, "20260101-000001-aaaaaaaa", "mallory", pairs, tiny_model, 200)
    long_b = _session(tmp_path, "20260101-000002-bbbbbbbb", "mallory", pairs, tiny_model, 200)
    short = _session(tmp_path, "20260101-000003-cccccccc", "bob", pairs, tiny_model, 1)
    queue = ThreadQueue(max_concurrent=1, time_slice_s=0)
    queue.launches = []
    queue.start()
    try:
        queue.submit(long_a)
        queue.submit(long_b)
        await _until(lambda: long_a.read_status().status_type == "running")
        queue.submit(short)
        assert queue.order() == [short.id, long_b.id]  # bob before mallory's second run
        await _until(lambda: short.read_status().status_type == "completed")
        paused = long_a.read_status()
        assert paused.status_type in ("waiting", "preparing", "running")
        assert 1 <= len(paused.train_losses) < 200  # it gave the slot up after an epoch
        # mallory's first run is continued (resume=True) before her second one starts
        await _until(lambda: len(queue.launches) >= 3)
        assert queue.launches[:3] == [(long_a.id, False), (short.id, False), (long_a.id, True)]
        done_at_pause = len(paused.train_losses)
        await _until(lambda: len(long_a.read_status().train_losses) > max(done_at_pause, 1))
        assert long_a.read_status().status_type == "running"
        assert long_b.read_status().status_type == "waiting"
    finally:
        await queue.close(timeout=120)
    final = long_a.read_status()
    assert final.status_type == "stopped" and len(final.train_losses) >= 2


def test_a_yield_request_pauses_the_run_after_its_epoch_with_everything_kept(
    tmp_path, tiny_model, train_pairs
):
    session = _session(tmp_path, "run", "mallory", train_pairs[:2], tiny_model, 2)
    session.request_yield()
    paused = run_training(session)
    assert paused.status_type == "waiting" and len(paused.train_losses) == 1
    assert session.optimizer_file.is_file() and not session.yield_requested
    done = run_training(session, resume=True)
    assert done.status_type == "completed" and len(done.train_losses) == 2
    assert done.train_losses[0] == paused.train_losses[0]
