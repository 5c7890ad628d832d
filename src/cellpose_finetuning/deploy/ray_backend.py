"""Scale out on Ray Serve: the same service object, other executors.

:class:`~cellpose_finetuning.service.api.CellposeService` talks to two
executors: one for ``infer`` and one for training. The embedded service runs
them in its own process (threads, worker processes). This module provides
their Ray versions:

- :class:`RayInference`: ``infer`` goes to a Ray Serve deployment
  (block-wise jobs too, their progress streamed),
  :class:`InferenceReplica`, with a fixed number of replicas or autoscaling
  between bounds, each with its CPU share and GPU *fraction* (replicas can
  share one GPU) and its own model cache. A call that lands on a replica
  that dies is retried once on another (inference has no side effects);
  a second failure is reported as a clear error.
- :class:`RayTrainingQueue`: each session trains in a Ray task with its own
  resource request (``training_cpus``, ``training_gpus``) in a fresh worker
  process (``max_calls=1``, so GPU memory is returned after each run), at
  most ``max_concurrent`` at a time, with a bounded queue behind them.

Session status, checkpoints and the dataset cache live in the service's
``data_dir``. Replicas and training tasks read and write them there, so on a
multi-node cluster ``data_dir`` must be a directory every node mounts at the
same path (NFS, CephFS, a cloud file store); on one machine any folder will
do. Each node also needs this package installed (same version) in the
Python that Ray runs.

Batching: cellpose already batches the 256x256 tiles of one image
(``batch_size`` tiles per forward pass). Batching *requests* would only pay
off for many tiny images on a GPU and needs cellpose internals (it segments
a list of images one after the other), so requests are spread over replicas
instead, and each replica runs one segmentation at a time while further
requests wait at the replica (so Serve's autoscaler sees the backlog).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.deploy.ray_leftovers import (
    RAY_PIDS_FILE,
    _kill_processes,
    _process_record,
    stop_ray_leftovers,
)
from cellpose_finetuning.engine.inference import ModelRef
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import CellposeFinetuningError, InvalidInput
from cellpose_finetuning.names import SERVICE_ID
from cellpose_finetuning.scheduler import LocalInference, SessionQueue
from cellpose_finetuning.scheduler.executors import pass_progress, segment_file_stream

__all__ = [
    "InferenceReplica",
    "RayBackend",
    "RayInference",
    "RayOptions",
    "RayTrainingQueue",
    "replica_actors",
]

log = logging.getLogger(__name__)

#: Environment variables handed to Ray workers when set here.
_FORWARDED_ENV = ("CELLPOSE_LOCAL_MODELS_PATH", "MPLBACKEND", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")


@dataclass
class RayOptions:
    """How the Ray backend runs.

    Parameters
    ----------
    address : str, optional
        Join this Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``).
        Without it a local Ray instance is started and stopped with the service.
    num_cpus, num_gpus : int, optional
        Size of the local instance (ignored with ``address``).
    inference_replicas : int
        Inference replicas at start (and at least, with autoscaling).
    max_inference_replicas : int, optional
        Autoscale up to this many replicas when requests queue up.
    replica_cpus : float
        CPUs reserved per inference replica.
    replica_gpus : float
        GPU per replica; a fraction (0.5) lets two replicas share one GPU.
    max_ongoing_requests : int
        Requests a replica accepts at once (it segments one at a time).
    training_cpus, training_gpus : float
        Resources each training task asks for.
    max_concurrent_trainings : int
        Training tasks running at once; further sessions wait in the queue.
    max_queued_trainings : int
        Sessions that may wait; more are refused with a clear error.
    torch_threads : int, optional
        Torch CPU threads in each replica and training task.
    device : str, optional
        Torch device; by default CUDA when the replica has a GPU, else CPU.
    app_name : str
        Name of the Serve application.
    """

    address: str | None = None
    num_cpus: int | None = 2
    num_gpus: int | None = None
    inference_replicas: int = 1
    max_inference_replicas: int | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 4
    training_cpus: float = 1.0
    training_gpus: float = 0.0
    max_concurrent_trainings: int = 1
    max_queued_trainings: int = 16
    torch_threads: int | None = None
    device: str | None = None
    app_name: str = SERVICE_ID  # the Serve application is named after the service

    def validate(self) -> None:
        """Raise :class:`InvalidInput` naming the first bad setting."""
        if self.inference_replicas < 1:
            raise InvalidInput("inference_replicas", "must be at least 1")
        if self.max_inference_replicas is not None and (
            self.max_inference_replicas < self.inference_replicas
        ):
            raise InvalidInput("max_inference_replicas", "must be >= inference_replicas")
        if not 0 <= self.replica_gpus <= 1 and not float(self.replica_gpus).is_integer():
            raise InvalidInput("replica_gpus", "a fraction of one GPU, or a whole number")
        for name in ("replica_cpus", "training_cpus", "training_gpus", "replica_gpus"):
            if getattr(self, name) < 0:
                raise InvalidInput(name, "must not be negative")
        for name in ("max_ongoing_requests", "max_concurrent_trainings", "max_queued_trainings"):
            if getattr(self, name) < 1:
                raise InvalidInput(name, "must be at least 1")


# --------------------------------------------------------------------------- inference
class InferenceReplica:
    """One Ray Serve replica: a model cache and one segmentation at a time.

    Turned into a Serve deployment by :class:`RayBackend`; plain Python
    otherwise (so it can be tested without Ray).
    """

    def __init__(
        self, device: str | None = None, max_models: int = 2, torch_threads: int | None = None
    ) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.executor = LocalInference(device=device, concurrency=1, max_models=max_models)

    async def segment(
        self,
        ref: ModelRef,
        images: Sequence[np.ndarray],
        names: Sequence[str],
        settings: InferenceSettings,
    ) -> list[np.ndarray]:
        """Segment ``images`` with the model behind ``ref`` (loaded once per replica)."""
        return await self.executor.segment(ref, images, names, settings)

    async def segment_file(
        self, ref: ModelRef, path: str, out: str, settings: InferenceSettings
    ) -> AsyncIterator[dict[str, Any]]:
        """Block-wise segmentation of a file (in ``data_dir``) in a thread; progress streamed."""
        async with self.executor._sem:  # one segmentation at a time per replica
            async for update in segment_file_stream(self.executor.models, ref, path, out, settings):
                yield update


def _is_replica_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the replica (not the request) failed."""
    from ray import exceptions as rex

    return isinstance(
        exc,
        rex.RayActorError | rex.ActorUnavailableError | rex.WorkerCrashedError,
    )


def _unwrap(exc: BaseException) -> BaseException:
    """The exception raised inside the replica or task, if Ray wrapped it."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


class RayInference:
    """The service's inference executor on Ray Serve.

    Parameters
    ----------
    handle : ray.serve.handle.DeploymentHandle
        Handle of the :class:`InferenceReplica` deployment.
    retries : int
        How often a call is sent again when its replica died under it.
    """

    def __init__(self, handle: Any, retries: int = 1) -> None:
        self.handle = handle
        self.retries = retries

    async def segment(
        self,
        ref: ModelRef,
        images: Sequence[np.ndarray],
        names: Sequence[str],
        settings: InferenceSettings,
    ) -> list[np.ndarray]:
        """Send the call to a replica; retry once on another if that replica dies."""
        for attempt in range(self.retries + 1):
            try:
                return await self.handle.segment.remote(ref, list(images), list(names), settings)
            except Exception as exc:
                if _is_replica_failure(exc):
                    log.warning("inference replica failed (attempt %d): %s", attempt + 1, exc)
                    if attempt < self.retries:
                        continue
                    raise CellposeFinetuningError(
                        "the inference replica stopped while segmenting (tried "
                        f"{attempt + 1} times); nothing was changed, call infer again"
                    ) from None
                raise _unwrap(exc) from None
        raise AssertionError("unreachable")

    async def segment_file(
        self,
        ref: ModelRef,
        path: str,
        out: str,
        settings: InferenceSettings,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Block-wise on a replica, progress streamed; not retried (the file is half written)."""
        try:
            stream = self.handle.options(stream=True).segment_file.remote(ref, path, out, settings)
            result = await pass_progress(stream, progress)
            if result is not None:
                return result
        except Exception as exc:
            if _is_replica_failure(exc):
                raise CellposeFinetuningError(
                    "the inference replica stopped while segmenting block-wise; call infer again"
                ) from None
            raise _unwrap(exc) from None
        raise CellposeFinetuningError("the inference replica's stream ended without a result")

    async def close(self) -> None:
        """The deployment is removed by :meth:`RayBackend.stop`."""


# --------------------------------------------------------------------------- training
def _train_in_ray(session_dir: str, resume: bool, num_threads: int | None) -> None:
    """Body of the Ray training task: the same worker entry point as local runs."""
    from cellpose_finetuning.engine.training import ignore_terminal_interrupt, worker_main

    ignore_terminal_interrupt()  # a fresh worker process per run (max_calls=1)
    worker_main(session_dir, resume, num_threads)


class RayTrainingQueue(SessionQueue):
    """The service's training executor on Ray: one Ray task per session.

    A task that dies without a final status (node lost, OOM kill) leaves its
    session ``failed`` with its last checkpoint.

    Parameters
    ----------
    max_concurrent : int
        Tasks running at once (their resources must also fit the cluster).
    max_queued : int
        Sessions that may wait; ``submit`` refuses more.
    num_cpus, num_gpus : float
        Resources each task asks for.
    num_threads : int, optional
        Torch CPU threads in the task.
    """

    def __init__(
        self,
        max_concurrent: int = 1,
        max_queued: int = 16,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(max_concurrent, max_queued, label="Ray training queue")
        self.run_name = "Ray training task"
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.num_threads = num_threads
        self._remote: Any = None

    def start(self) -> None:
        """Define the Ray task, then start dispatching."""
        import ray

        self._remote = ray.remote(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_calls=1,  # a fresh process per run: no state or GPU memory carried over
            max_retries=0,  # a crashed run is reported, then continued on request
        )(_train_in_ray)
        super().start()

    def _launch(self, session: Session, resume: bool) -> Any:
        session.update_status(status_type="preparing", message="Starting the training task on Ray")
        return self._remote.remote(str(session.path), resume, self.num_threads)

    async def _join(self, handle: Any) -> None:
        await handle

    def _cause(self, exc: BaseException) -> BaseException:
        return _unwrap(exc)


# --------------------------------------------------------------------------- backend
def replica_actors(app_name: str = SERVICE_ID) -> list[Any]:
    """Actor handles of the running inference replicas of ``app_name``."""
    import ray

    return [
        ray.get_actor(entry["name"], namespace=entry["namespace"])
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["name"].startswith("SERVE_REPLICA::")
        and f"{app_name}#cellpose-inference#" in entry["name"]
    ]


class RayBackend:
    """Start (or join) Ray, deploy the inference replicas, hand out executors.

    Parameters
    ----------
    options : RayOptions
        Cluster, replicas and resources. The service's data directory, which
        replicas and training tasks read and write, must be shared by every node.
    state_dir : path, optional
        Where a local Ray's processes are recorded (``ray.pids``), so that
        a later start stops them if this process is killed before
        :meth:`stop` (see
        :func:`~cellpose_finetuning.deploy.ray_leftovers.stop_ray_leftovers`).
    """

    def __init__(
        self, options: RayOptions, state_dir: str | os.PathLike[str] | None = None
    ) -> None:
        options.validate()
        self.options = options
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.handle: Any = None
        self._owns_ray = False
        self._started_ray = False
        self._processes: list[Any] = []

    def _record_processes(self) -> None:
        """Write the local Ray's processes to ``state_dir/ray.pids``.

        The head processes (GCS, raylet...) and those under them at this
        moment: the raylet's agents outlive it when it is killed. Workers
        started later end with the raylet.
        """
        import psutil
        from ray._private import worker

        node = getattr(worker, "_global_node", None)
        if node is None:
            return
        procs = []
        for _, popen in node.live_processes():
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(popen.pid))
        self._processes = procs
        if self.state_dir is None:
            return
        records = [r for r in map(_process_record, self.processes()) if r]
        path = self.state_dir / RAY_PIDS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, path)

    def processes(self) -> list[Any]:
        """The local Ray's processes (head processes and their workers) still running."""
        import psutil

        found: dict[int, Any] = {}
        for proc in self._processes:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    found[proc.pid] = proc
                    found.update({c.pid: c for c in proc.children(recursive=True)})
        return list(found.values())

    def start(self) -> RayBackend:
        """Initialise Ray and deploy the inference application (blocking)."""
        # Serve's router asks replicas for their queue length with a 0.1 s
        # deadline; a replica busy with CPU-bound segmentation misses it and the
        # router then picks blindly. Give it time (read when Serve is imported).
        os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
        import ray
        from ray import serve

        o = self.options
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        # Ray's own threads (raylet, Serve's controller and replica loops) share
        # the cores with torch; OpenMP threads spinning at barriers then stall
        # each other: on 2 cores a 512x512 call took 1.3-4.3 s instead of 0.6 s.
        # Sleeping instead of spinning costs nothing measurable (see benchmarks).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if not ray.is_initialized():
            common: dict[str, Any] = {
                "namespace": SERVICE_ID,
                "log_to_driver": False,
                "runtime_env": {"env_vars": env} if env else None,
            }
            if o.address:
                ray.init(address=o.address, **common)
            else:
                if self.state_dir is not None:
                    stop_ray_leftovers(self.state_dir)
                ray.init(
                    num_cpus=o.num_cpus,
                    num_gpus=o.num_gpus,
                    include_dashboard=False,
                    **common,
                )
                self._started_ray = True
                self._record_processes()  # again below, with the agents and replicas
            self._owns_ray = True
        serve.start(proxy_location="Disabled")
        deployment_options: dict[str, Any] = {
            "name": "cellpose-inference",
            "ray_actor_options": {"num_cpus": o.replica_cpus, "num_gpus": o.replica_gpus},
            "max_ongoing_requests": o.max_ongoing_requests,
            "health_check_period_s": 10,
        }
        if o.max_inference_replicas and o.max_inference_replicas > o.inference_replicas:
            deployment_options["autoscaling_config"] = {
                "min_replicas": o.inference_replicas,
                "initial_replicas": o.inference_replicas,
                "max_replicas": o.max_inference_replicas,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0,
                "downscale_delay_s": 300,
            }
        else:
            deployment_options["num_replicas"] = o.inference_replicas
        device = o.device or ("cuda" if o.replica_gpus > 0 else "cpu")
        app = (
            serve.deployment(InferenceReplica)
            .options(**deployment_options)
            .bind(device=device, torch_threads=o.torch_threads)
        )
        self.handle = serve.run(app, name=o.app_name, route_prefix=None)
        if self._started_ray:
            self._record_processes()
        return self

    def inference(self) -> RayInference:
        """The inference executor for :class:`CellposeService`."""
        if self.handle is None:
            raise CellposeFinetuningError("the Ray backend is not started")
        return RayInference(self.handle)

    def training(self) -> RayTrainingQueue:
        """The training executor for :class:`CellposeService`."""
        o = self.options
        return RayTrainingQueue(
            o.max_concurrent_trainings,
            o.max_queued_trainings,
            num_cpus=o.training_cpus,
            num_gpus=o.training_gpus,
            num_threads=o.torch_threads,
        )

    def stop(self) -> None:
        """Remove the application; shut Ray down if this backend started it.

        On a cluster joined with ``address`` only this service's Serve
        application is removed (Serve itself and the cluster keep running)
        and the driver disconnects. A local Ray started here is shut down,
        and its processes are waited for (then killed if still there).
        Idempotent.
        """
        import ray
        from ray import serve

        if self.handle is not None:
            with contextlib.suppress(Exception):
                serve.delete(self.options.app_name)
        if self._owns_ray:
            if self._started_ray:
                with contextlib.suppress(Exception):
                    serve.shutdown()
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._owns_ray = False
        if self._started_ray:
            # ray.shutdown() stops the head processes; their workers follow
            # within moments. Wait for them (bounded), then kill what is left.
            deadline = time.monotonic() + 10
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.kill()
        self.handle = None

    def kill(self) -> int:
        """Kill the local Ray started here at once; how many processes ran.

        Makes no call into Ray, so it is safe from any thread, also while
        :meth:`stop` hangs. Does nothing on a joined cluster.
        """
        if not self._started_ray:
            return 0
        killed = _kill_processes(self.processes(), grace=0.0)
        if self.state_dir is not None:
            (self.state_dir / RAY_PIDS_FILE).unlink(missing_ok=True)
        return killed
