"""Block-wise job records survive a restart: finished jobs answer as they ended, running ones fail.

Plain :class:`InferenceJobs` on a temporary folder (no server); the stack's
block-wise job itself is in ``test_blockwise_jobs.py``.
"""

from __future__ import annotations

import json
import time

import pytest

from cellpose_finetuning.errors import NotFound
from cellpose_finetuning.service import jobs as jobs_module
from cellpose_finetuning.service.jobs import InferenceJobs


def _finish(store: InferenceJobs, job, **result) -> None:
    job.status, job.finished, job.n_objects = "completed", time.time(), 7
    job.blocks_done = job.blocks_total = 8
    job.result = {"artifact_id": "ws/cpft-labels-x", "file": "a_masks.tif", **result}
    store.save(job)


def test_a_restart_keeps_finished_jobs_for_their_owner_and_fails_running_ones(tmp_path):
    before = InferenceJobs(tmp_path)
    done = before.new("alice", "slide.tif")
    _finish(before, done, download_url="http://s3/presigned?Signature=secret")
    running = before.new("alice", "other.tif")
    running.status, running.blocks_done, running.blocks_total = "running", 3, 8

    after = InferenceJobs(tmp_path)
    assert after.load() == 2
    kept = after.get(done.id, "alice").public()
    assert kept["status"] == "completed" and kept["n_objects"] == 7
    assert kept["artifact_id"] == "ws/cpft-labels-x" and kept["file"] == "a_masks.tif"
    assert "download_url" not in kept  # never on disk: the service makes a fresh one per poll
    assert "Signature" not in (tmp_path / f"{done.id}.json").read_text()
    interrupted = after.get(running.id, "alice").public()
    assert interrupted["status"] == "failed"
    assert "restart" in interrupted["error"]
    with pytest.raises(NotFound):  # another user's job reads as unknown, after a restart too
        after.get(done.id, "bob")
    # the failure was recorded: a second restart reads the same
    again = InferenceJobs(tmp_path)
    again.load()
    assert again.get(running.id, "alice").public()["status"] == "failed"


def test_scratch_cleanup_keeps_the_records_and_forgotten_jobs_lose_theirs(tmp_path, monkeypatch):
    store = InferenceJobs(tmp_path)
    job = store.new("alice", "slide.tif")
    store.folder(job)
    _finish(store, job)
    assert store.clean_leftovers() == [job.id]  # the scratch folder of a finished job
    assert (tmp_path / f"{job.id}.json").is_file()
    monkeypatch.setattr(jobs_module, "MAX_KEPT_JOBS_PER_USER", 1)
    newer = store.new("alice", "next.tif")  # forgets the finished one, record included
    assert not (tmp_path / f"{job.id}.json").exists()
    assert (tmp_path / f"{newer.id}.json").is_file()


def test_an_unreadable_record_is_skipped(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "partial.json").write_text(json.dumps({"id": "x"}))
    store = InferenceJobs(tmp_path)
    assert store.load() == 0
