"""Block-wise job results expire: only the service's own, only after their time, retried on failure.

The selection is tested on records shaped like the artifact manager's
(``id``, ``alias``, ``created_by``, ``created_at``); the sweep with a stand-in
artifact manager; the real listing and deletion on the stack in
``test_blockwise_jobs.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cellpose_finetuning.service.api import CellposeService, ServiceConfig
from cellpose_finetuning.service.auth import WorkspaceOwners
from cellpose_finetuning.service.jobs import (
    RESULT_PREFIX,
    InferenceJobs,
    delete_expired_results,
    expired_results,
)

SERVICE = "service-user"
NOW = 1_000_000.0
DAY = 86400.0


def _record(alias: str, created_by: str = SERVICE, age: float = 2 * DAY, ws: str = "svc") -> dict:
    return {
        "id": f"{ws}/{alias}",
        "alias": alias,
        "created_by": created_by,
        "created_at": int(NOW - age),
    }


def test_only_old_results_created_by_the_service_are_selected():
    records = [
        _record(f"{RESULT_PREFIX}old"),
        _record(f"{RESULT_PREFIX}young", age=DAY / 2),
        _record(f"{RESULT_PREFIX}planted", created_by="mallory"),  # in our workspace, not ours
        _record("my-dataset"),  # ours, old, not a result
        _record(f"x-{RESULT_PREFIX}old"),
        {"id": f"svc/{RESULT_PREFIX}no-time", "created_by": SERVICE},
        _record(f"{RESULT_PREFIX}exactly", age=DAY),
    ]
    got = expired_results(records, service_user=SERVICE, now=NOW, ttl_s=DAY)
    assert got == [f"svc/{RESULT_PREFIX}old", f"svc/{RESULT_PREFIX}exactly"]


@pytest.mark.parametrize(("user", "ttl"), [(None, DAY), ("", DAY), (SERVICE, 0)])
def test_nothing_is_selected_without_the_services_user_or_with_ttl_zero(user, ttl):
    assert (
        expired_results([_record(f"{RESULT_PREFIX}a")], service_user=user, now=NOW, ttl_s=ttl) == []
    )


def test_an_alias_field_that_disagrees_with_the_id_is_not_trusted():
    record = {**_record(f"{RESULT_PREFIX}a"), "id": "svc/alices-dataset"}
    assert expired_results([record], service_user=SERVICE, now=NOW, ttl_s=DAY) == []


class _Manager:
    """Stands in for the artifact manager: ``list`` in pages, ``delete`` that may fail."""

    def __init__(self, records: list[dict[str, Any]], failing: set[str] = frozenset()) -> None:
        self.records = records
        self.failing = set(failing)
        self.calls: list[dict[str, Any]] = []

    async def list(self, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append(kwargs)
        return self.records[kwargs["offset"] : kwargs["offset"] + kwargs["limit"]]

    async def delete(self, artifact_id: str, delete_files: bool = False) -> None:
        assert delete_files
        if artifact_id in self.failing:
            raise RuntimeError("database is locked")
        self.records = [r for r in self.records if r["id"] != artifact_id]


def test_a_failed_deletion_is_logged_and_retried_at_the_next_sweep(caplog):
    am = _Manager(
        [_record(f"{RESULT_PREFIX}{i}") for i in range(3)] + [_record("keep")],
        failing={f"svc/{RESULT_PREFIX}1"},
    )
    sweep = delete_expired_results(am, service_user=SERVICE, ttl_s=DAY, now=NOW)
    assert asyncio.run(sweep) == [f"svc/{RESULT_PREFIX}0", f"svc/{RESULT_PREFIX}2"]
    assert "database is locked" in caplog.text
    assert am.calls[0]["stage"] == "all"  # a result whose upload failed is staged
    am.failing.clear()
    sweep = delete_expired_results(am, service_user=SERVICE, ttl_s=DAY, now=NOW)
    assert asyncio.run(sweep) == [f"svc/{RESULT_PREFIX}1"]
    assert [r["id"] for r in am.records] == ["svc/keep"]


def test_every_page_of_the_listing_is_read():
    am = _Manager([_record(f"{RESULT_PREFIX}{i}") for i in range(2500)])
    deleted = asyncio.run(delete_expired_results(am, service_user=SERVICE, ttl_s=DAY, now=NOW))
    assert len(deleted) == 2500 and [c["offset"] for c in am.calls] == [0, 1000, 2000]


def test_scratch_folders_of_jobs_not_running_are_removed(tmp_path):
    jobs = InferenceJobs(tmp_path)
    running = jobs.new("alice", "slide.tif")
    done = jobs.new("alice", "other.tif")
    done.finished = NOW
    for job in (running, done):
        (jobs.folder(job) / "labels.tif").write_bytes(b"x")
    (tmp_path / "from-a-killed-process").mkdir()
    assert sorted(jobs.clean_leftovers()) == sorted([done.id, "from-a-killed-process"])
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [running.id]
    assert {p.name for p in tmp_path.glob("*.json")} == {f"{running.id}.json", f"{done.id}.json"}


class _Broken:
    async def list(self, **kwargs: Any) -> list[dict[str, Any]]:
        raise ConnectionError("hypha is restarting")


def test_the_service_sweeps_at_start_and_a_failing_sweep_never_stops_it(tmp_path, caplog):
    async def run() -> None:
        config = ServiceConfig(data_dir=tmp_path, job_result_ttl_hours=1)
        svc = CellposeService(config, _Broken(), owners=WorkspaceOwners(service_user=SERVICE))
        (config.data_dir / "jobs" / "left-over").mkdir(parents=True)
        await svc.start()
        try:
            assert svc._sweeper is not None
            assert await svc.sweep() == []  # logged, not raised
            assert not (config.data_dir / "jobs" / "left-over").exists()
            assert not svc._sweeper.done()  # still scheduled
        finally:
            await svc.close()
        assert svc._sweeper.cancelled()

    asyncio.run(run())
    assert "hypha is restarting" in caplog.text
