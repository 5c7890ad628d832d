"""Where the service's work runs: the executor interfaces and their local implementations.

The service talks only to :class:`TrainingExecutor` and
:class:`InferenceExecutor`, so its API is the same object whatever runs the
work: here, worker processes (:class:`TrainingQueue`) and threads
(:class:`LocalInference`); on BioEngine, Ray tasks and Ray Serve replicas
(:mod:`cellpose_finetuning.deploy.ray_backend`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import numpy as np

from cellpose_finetuning.engine.inference import ModelCache, ModelRef, segment_auto, segment_many
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.engine.workers import TrainingWorker, start_worker
from cellpose_finetuning.scheduler.queue import SessionQueue

__all__ = [
    "InferenceExecutor",
    "LocalInference",
    "TrainingExecutor",
    "TrainingQueue",
    "segment_file_stream",
]


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


class InferenceExecutor(Protocol):
    """Where the service's ``infer`` runs: in this process, or on Ray Serve replicas."""

    async def segment(
        self,
        ref: ModelRef,
        images: Sequence[np.ndarray],
        names: Sequence[str],
        settings: InferenceSettings,
    ) -> list[np.ndarray]:
        """Segment ``images`` with the model behind ``ref``."""
        ...

    async def segment_file(
        self,
        ref: ModelRef,
        path: str,
        out: str,
        settings: InferenceSettings,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Segment the 2D image file ``path`` block-wise into the label file ``out``.

        ``progress`` gets ``{"done", "total", "objects", "elapsed"}`` after each
        block; the answer is :func:`segment_file_stream`'s summary.
        """
        ...

    async def close(self) -> None:
        """Release what the executor holds."""
        ...


async def segment_file_stream(
    models: ModelCache, ref: ModelRef, path: str, out: str, settings: InferenceSettings
) -> AsyncIterator[dict[str, Any]]:
    """Segment an image file block by block in a worker thread; yield its progress.

    Yields ``{"done", "total", "objects", "elapsed"}`` after each block, then
    ``{"result": {"n_objects", "shape", "dtype", "block_size", "overlap",
    "n_blocks", "truncated", "seconds"}}``. The event loop only passes the
    messages on (the local executor and Ray Serve replicas, which stream them).
    """
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def progress(p: Any) -> None:
        update = {"done": p.done, "total": p.total, "objects": p.objects, "elapsed": p.elapsed}
        loop.call_soon_threadsafe(updates.put_nowait, update)

    def run() -> dict[str, Any]:
        model = models.get(ref)
        result = segment_auto(model, path, settings, name=path, out=out, progress=progress)
        return {
            "n_objects": int(result.n_objects),
            "shape": [int(v) for v in result.shape],
            "dtype": str(result.masks.dtype),
            "block_size": int(result.block_size),
            "overlap": int(result.overlap),
            "n_blocks": int(result.n_blocks),
            "truncated": int(result.truncated),
            "seconds": float(result.seconds),
        }

    task = asyncio.ensure_future(asyncio.to_thread(run))
    while True:
        getter = asyncio.ensure_future(updates.get())
        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
            continue
        getter.cancel()
        while not updates.empty():
            yield updates.get_nowait()
        yield {"result": task.result()}  # raises the thread's error
        return


async def pass_progress(
    stream: AsyncIterator[dict[str, Any]],
    progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any] | None:
    """Hand a :func:`segment_file_stream`'s updates to ``progress``; return its result.

    None when the stream ended without one (the caller says why).
    """
    async for update in stream:
        if "result" in update:
            return update["result"]
        if progress is not None:
            progress(update)
    return None


class LocalInference:
    """Run inference in this process, in worker threads, a few calls at a time.

    Parameters
    ----------
    device : str, optional
        Torch device for every model.
    concurrency : int
        Calls segmenting at once; the rest wait their turn.
    max_models : int
        Models kept loaded.
    """

    def __init__(self, device: str | None = None, concurrency: int = 1, max_models: int = 2):
        self.models = ModelCache(max_models=max_models, device=device)
        self._sem = asyncio.Semaphore(concurrency)

    async def segment(
        self,
        ref: ModelRef,
        images: Sequence[np.ndarray],
        names: Sequence[str],
        settings: InferenceSettings,
    ) -> list[np.ndarray]:
        """Load (or reuse) the model and segment ``images`` in a worker thread."""
        async with self._sem:
            model = await asyncio.to_thread(self.models.get, ref)
            return await asyncio.to_thread(segment_many, model, images, settings, names)

    async def segment_file(
        self,
        ref: ModelRef,
        path: str,
        out: str,
        settings: InferenceSettings,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Segment an image file block-wise in a worker thread (one call at a time here too)."""
        async with self._sem:
            stream = segment_file_stream(self.models, ref, path, out, settings)
            result = await pass_progress(stream, progress)
        if result is None:
            raise AssertionError("the stream ends with its result")
        return result

    async def close(self) -> None:
        """Nothing to release: models go with the process."""
