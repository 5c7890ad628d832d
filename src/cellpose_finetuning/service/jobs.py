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

Jobs live in the service's memory: a restart forgets them (the result
artifacts stay).
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.errors import NotFound, ResourceLimit

__all__ = ["InferenceJob", "InferenceJobs", "compress_labels"]

#: Jobs one user may have running (waiting or segmenting) at once.
MAX_RUNNING_JOBS_PER_USER = 4
#: Finished jobs kept for polling, per user (oldest forgotten first).
MAX_KEPT_JOBS_PER_USER = 50


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
        job = InferenceJob(id=uuid.uuid4().hex, owner=owner, input_path=input_path)
        self._jobs[job.id] = job
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

    async def close(self) -> None:
        """Cancel running jobs."""
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()


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
