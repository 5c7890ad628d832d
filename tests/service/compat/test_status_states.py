"""The contract's status-reading examples, verbatim, against a session in every state.

The seed's Quick Start loop formats ``status['elapsed_seconds']`` as soon as
the key is there, and its status example prints ``elapsed_seconds`` whenever
``current_epoch`` is present: a ``None`` in either place is a ``TypeError``.
Statuses are captured from real sessions on the real stack (waiting behind
another run, preparing, running, stopped, completed, failed) and every
client's formatting runs on each of them.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cellpose_finetuning.client import upload_folder
from tests.service.compat import clients

pytestmark = pytest.mark.stack

STATES = {"waiting", "preparing", "running", "completed", "failed", "stopped"}


@pytest.fixture(scope="module")
async def carol(running_stack):
    server = await running_stack.connect("carol")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
async def captured(carol, dev_data):
    """Every distinct status seen while three sessions go through their lives."""
    server, svc = carol
    dataset = await upload_folder(server, dev_data, alias="compat-states")
    common = dict(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        test_images="images/test/",
        test_annotations="annotations/test/",
        model="tiny",
        learning_rate=1e-3,
        validation_interval=2,
    )
    first = (await svc.start_training(n_epochs=30, **common))["session_id"]
    second = (await svc.start_training(n_epochs=2, **common))["session_id"]
    seen: dict[str, list[dict]] = {}
    stopped = False
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline:
        for sid in (first, second):
            st = await svc.get_training_status(sid)
            seen.setdefault(st["status_type"], []).append(st)
        a = seen_status(seen, first)
        if a and a["status_type"] == "running" and a.get("train_losses") and not stopped:
            await svc.stop_training(first)
            stopped = True
        b = seen_status(seen, second)
        ended = ("stopped", "completed", "failed")
        # Sessions start in the order their preparation ends, so the second may be done
        # before the first is stopped: poll on until the stop has been seen as well.
        if stopped and a["status_type"] in ended and b and b["status_type"] in ended:
            break
        await asyncio.sleep(0.05)
    # A run that fails in the worker: no training image has that many objects.
    bad = await svc.start_training(n_epochs=2, min_train_masks=100_000, **common)
    while True:
        st = await svc.get_training_status(bad["session_id"])
        seen.setdefault(st["status_type"], []).append(st)
        if st["status_type"] in ("failed", "completed") or time.monotonic() > deadline + 300:
            break
        await asyncio.sleep(0.2)
    return seen


def seen_status(seen: dict[str, list[dict]], sid: str) -> dict | None:
    latest = [s for group in seen.values() for s in group if s["session_id"] == sid]
    return max(latest, key=lambda s: s.get("updated_at", ""), default=None)


def test_every_state_was_seen(captured):
    assert set(captured) == STATES, sorted(captured)


@pytest.mark.parametrize("state", sorted(STATES))
def test_the_contract_examples_run_verbatim_in_each_state(captured, state, capsys):
    for status in captured[state]:
        line = clients.seed_quick_start_line(status)
        assert line.startswith(f"[{state}] ")
        report = clients.seed_status_report(status)
        assert "Training samples:" in report
        assert clients.original_cli_monitor_line(status).startswith(f"[{state}]")
        assert clients.notebook_monitor_line(status).startswith(f"[{state}]")


@pytest.mark.parametrize("state", sorted(STATES))
def test_no_key_is_none_and_internals_are_hidden(captured, state):
    for status in captured[state]:
        assert [k for k, v in status.items() if v is None] == []
        assert not {"worker_pid", "worker_host", "worker_create_time"} & set(status)
        assert status["user_id"] == "carol"
        # the run's parameters at the top level, as the original shows them
        assert status["model"] == "tiny" and status["learning_rate"] == 1e-3
        assert status["min_train_masks"] in (5, 100_000) and status["validation_interval"] == 2


def test_keys_appear_once_known(captured):
    for status in captured["waiting"] + captured["preparing"]:
        if not status.get("train_losses"):
            assert "elapsed_seconds" not in status or "current_epoch" in status
            assert "instance_metrics" not in status and "current_loss" not in status
    running = [s for s in captured["running"] if s.get("train_losses")]
    assert running, "no running status with a finished epoch was seen"
    for status in running:
        assert status["current_loss"] == status["train_losses"][-1]
        assert {"current_epoch", "total_epochs", "elapsed_seconds"} <= set(status)
    batched = [s for s in captured["running"] if "current_batch" in s]
    assert batched and all(0 <= s["current_batch"] < s["total_batches"] for s in batched)
    done = captured["completed"][-1]
    assert set(done["instance_metrics"]) >= {"ap_0_5", "ap_0_75", "ap_0_9", "n_true", "n_pred"}
    assert done["model_modified"] is True
    assert "Latest val loss" in clients.seed_status_report(done)
    # loss lists as the contract shows them: None where validation was skipped
    stopped = captured["stopped"][-1]
    assert len(stopped["test_losses"]) == len(stopped["train_losses"]) >= 1
    assert stopped["test_losses"][0] is not None
    waiting = captured["waiting"][-1]
    assert "queue" in waiting["message"].lower() or "wait" in waiting["message"].lower()
