"""Block-wise ``infer`` jobs: whole-slide images whose labels are too large for one RPC answer.

hypha-rpc encodes a method's whole answer with msgpack in memory, then sends
anything above 256 KiB (``hypha_rpc.rpc.CHUNK_SIZE``) as 256 KiB chunks that
the receiver reassembles in memory too. A 16384² slide's labels are 1 GiB of
uint32: 4,096 chunks, and full copies on both ends, the very memory
block-wise segmentation saves, with no progress until the end. Streaming the
labels through a generator would move the same gigabyte through the RPC
connection. So an ``infer`` on such an image answers at once with a job id;
the blocks run in the inference executor's worker (a thread here, a Ray Serve
replica there), :meth:`get_inference_status` reports blocks done and objects
found, and the labels, written region by region to disk, are compressed
(zlib, tiled: labels shrink ~50x) and uploaded as a file to a result
artifact in the service's workspace that only the caller may read; the
status then carries the artifact id, the file name and a download URL.

Each job's record (owner, status, progress at the end, result) is kept in
``<jobs dir>/<id>.json``, written when the job starts and when it ends, so a
restarted service still answers a poll: a finished job as it ended, one that
was running as ``failed`` ("interrupted by a service restart"). Result
artifacts expire (``ServiceConfig.job_result_ttl_hours``):
:func:`delete_expired_results` deletes those older than that, at start and then
hourly, but only root artifacts of the service's workspace whose alias is a
result's (:data:`RESULT_PREFIX`) *and* whose ``created_by`` is the service's own
user: on hypha 0.21.137 anyone can create artifacts in another user's workspace,
under any alias.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import NotFound, ResourceLimit

__all__ = [
    "RESULT_PREFIX",
    "InferenceJob",
    "InferenceJobs",
    "compress_labels",
    "delete_expired_results",
    "expired_results",
]

log = logging.getLogger("cellpose_finetuning.service.jobs")
#: Alias of a job's result artifact: this prefix and the job id.
RESULT_PREFIX = "cpft-labels-"
#: Seconds between sweeps of expired results and left-over scratch folders.
SWEEP_INTERVAL_S = 3600.0
#: Artifacts asked for per ``list`` call (the artifact manager's most).
LIST_PAGE = 1000

#: Jobs one user may have running (waiting or segmenting) at once.
MAX_RUNNING_JOBS_PER_USER = 4
#: Finished jobs kept for polling, per user (oldest forgotten first).
MAX_KEPT_JOBS_PER_USER = 50


#: The fields of a job's record on disk.
_RECORD_FIELDS = (
    "id", "owner", "input_path", "status", "blocks_done", "blocks_total", "n_objects",
    "started", "finished", "error", "result",
)  # fmt: skip


@dataclass
class InferenceJob:
    """One block-wise segmentation of one artifact image."""

    id: str
    owner: str
    input_path: str
    status: str = "waiting"  # waiting, running, uploading, completed, failed
    blocks_done: int = 0
    blocks_total: int | None = None
    n_objects: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    def progress(self, update: dict[str, Any]) -> None:
        """Take one block's progress from the executor."""
        self.status = "running"
        self.blocks_done = int(update["done"])
        self.blocks_total = int(update["total"])
        self.n_objects = int(update["objects"])

    def record(self) -> dict[str, Any]:
        """What is kept on disk: everything but the task and the presigned URL (it expires)."""
        out = {k: getattr(self, k) for k in _RECORD_FIELDS}
        out["result"] = {k: v for k, v in self.result.items() if k != "download_url"}
        return out

    def public(self) -> dict[str, Any]:
        """What ``get_inference_status`` returns."""
        out: dict[str, Any] = {
            "job_id": self.id,
            "status": self.status,
            "input_path": self.input_path,
            "blocks_done": self.blocks_done,
            "blocks_total": self.blocks_total,
            "n_objects": self.n_objects,
            "elapsed_seconds": round((self.finished or time.time()) - self.started, 3),
        }
        if self.error:
            out["error"] = self.error
        out.update(self.result)
        return out


class InferenceJobs:
    """The jobs of this service, by id; each visible to its owner only."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._jobs: dict[str, InferenceJob] = {}

    def _record_path(self, job_id: str) -> Path:
        return self.work_dir / f"{job_id}.json"

    def save(self, job: InferenceJob) -> None:
        """Write the job's record (atomically); a failure is logged, the job goes on."""
        path = self._record_path(job.id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(job.record()))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not record inference job %s: %s", job.id, exc)

    def load(self) -> int:
        """Take the records a previous run left; jobs it was running become failed.

        Returns the number of jobs loaded. Unreadable records are skipped (logged).
        """
        if not self.work_dir.is_dir():
            return 0
        now = time.time()
        for path in sorted(self.work_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                job = InferenceJob(
                    **{k: data[k] for k in InferenceJob(id="", owner="", input_path="").record()}
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable inference job record %s: %s", path.name, exc)
                continue
            if job.finished is None:
                job.status, job.finished = "failed", now
                job.error = "interrupted by a service restart; call infer again"
                self.save(job)
            self._jobs[job.id] = job
        return len(self._jobs)

    def new(self, owner: str, input_path: str) -> InferenceJob:
        """Register a job for ``owner`` (refused above the per-user cap)."""
        mine = [j for j in self._jobs.values() if j.owner == owner]
        if sum(j.finished is None for j in mine) >= MAX_RUNNING_JOBS_PER_USER:
            raise ResourceLimit(
                f"at most {MAX_RUNNING_JOBS_PER_USER} block-wise infer jobs per user at once; "
                "poll get_inference_status until one is done"
            )
        finished = sorted((j for j in mine if j.finished), key=lambda j: j.finished or 0)
        for old in finished[: max(0, len(finished) - MAX_KEPT_JOBS_PER_USER + 1)]:
            del self._jobs[old.id]
            with contextlib.suppress(OSError):
                self._record_path(old.id).unlink()
        job = InferenceJob(id=uuid.uuid4().hex, owner=owner, input_path=input_path)
        self._jobs[job.id] = job
        self.save(job)
        return job

    def get(self, job_id: Any, owner: str) -> InferenceJob:
        """The caller's job; an unknown id and another user's job give the same error."""
        job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None or job.owner != owner:
            raise NotFound("inference job", str(job_id), "job_id is infer's answer for that image")
        return job

    def folder(self, job: InferenceJob) -> Path:
        """Scratch folder of a job (labels before upload)."""
        path = self.work_dir / job.id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clean(self, job: InferenceJob) -> None:
        """Remove a job's scratch folder."""
        shutil.rmtree(self.work_dir / job.id, ignore_errors=True)

    def clean_leftovers(self) -> list[str]:
        """Remove scratch folders of jobs not running here (a killed process left them)."""
        if not self.work_dir.is_dir():
            return []
        running = {j.id for j in self._jobs.values() if j.finished is None}
        gone = [p.name for p in self.work_dir.iterdir() if p.is_dir() and p.name not in running]
        for name in gone:
            shutil.rmtree(self.work_dir / name, ignore_errors=True)
        return gone

    async def close(self) -> None:
        """Cancel running jobs."""
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()


def expired_results(
    records: list[dict[str, Any]], *, service_user: str | None, now: float, ttl_s: float
) -> list[str]:
    """Ids of the result artifacts to delete among artifact records.

    A record qualifies when its alias starts with :data:`RESULT_PREFIX`, its
    ``created_by`` is ``service_user`` and its ``created_at`` (epoch seconds)
    is at least ``ttl_s`` before ``now``. Without a ``service_user`` nothing does.
    """
    if not service_user or ttl_s <= 0:
        return []
    out = []
    for record in records:
        artifact_id = str(record.get("id") or "")
        alias = str(record.get("alias") or artifact_id.rpartition("/")[2])
        created = record.get("created_at")
        if (
            alias.startswith(RESULT_PREFIX)
            and artifact_id.rpartition("/")[2] == alias
            and record.get("created_by") == service_user
            and isinstance(created, int | float)
            and not isinstance(created, bool)
            and now - created >= ttl_s
        ):
            out.append(artifact_id)
    return out


async def _root_artifacts(artifact_manager: Any) -> list[dict[str, Any]]:
    """Every root artifact of the connection's workspace, committed or staged."""
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = await artifact_manager.list(stage="all", offset=offset, limit=LIST_PAGE, silent=True)
        out.extend(dict(item) for item in page)
        if len(page) < LIST_PAGE:
            return out
        offset += LIST_PAGE


async def delete_expired_results(
    artifact_manager: Any,
    *,
    service_user: str | None,
    ttl_s: float,
    now: float | None = None,
) -> list[str]:
    """Delete the service's result artifacts older than ``ttl_s`` (see :func:`expired_results`).

    A deletion that fails is logged and left for the next sweep.

    Returns
    -------
    list of str
        The ids deleted.
    """
    if not service_user or ttl_s <= 0:
        return []
    records = await _root_artifacts(artifact_manager)
    expired = expired_results(
        records, service_user=service_user, now=time.time() if now is None else now, ttl_s=ttl_s
    )
    deleted = []
    for artifact_id in expired:
        try:
            await artifact_manager.delete(artifact_id, delete_files=True)
        except Exception as exc:
            log.warning(
                "could not delete expired result %s (next sweep retries): %s", artifact_id, exc
            )
            continue
        deleted.append(artifact_id)
    if deleted:
        log.info("deleted %d expired block-wise job result(s)", len(deleted))
    return deleted


def compress_labels(src: Path, dst: Path, tile: int = 512) -> int:
    """Copy an uncompressed label TIFF to a tiled, zlib-compressed BigTIFF, strip by strip.

    Returns the size of ``dst`` in bytes. Memory: one row of tiles.
    """
    import tifffile

    labels = tifffile.memmap(src, mode="r")
    height, width = labels.shape
    dtype = labels.dtype
    del labels

    def tiles() -> Any:
        for y0 in range(0, height, tile):
            mm = tifffile.memmap(src, mode="r")
            strip = np.array(mm[y0 : y0 + tile])
            del mm
            for x0 in range(0, width, tile):
                part = strip[:, x0 : x0 + tile]
                if part.shape != (tile, tile):
                    padded = np.zeros((tile, tile), dtype)
                    padded[: part.shape[0], : part.shape[1]] = part
                    part = padded
                yield part

    tifffile.imwrite(
        dst,
        tiles(),
        shape=(height, width),
        dtype=dtype,
        tile=(tile, tile),
        compression="zlib",
        bigtiff=True,
    )
    return dst.stat().st_size
