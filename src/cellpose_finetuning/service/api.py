"""The service of the contract: the object registered on Hypha.

Method names, arguments, defaults and return keys are the original hosted
service's (``infer``, ``start_training``, ``get_training_status``,
``list_pretrained_models``, plus ``export_model`` and
``list_models_by_dataset``), with what it grew later (``stop_training``,
``restart_training``, ``list_training_sessions``,
``delete_training_session``, ``get_training_capabilities``).

Every method takes the Hypha RPC ``context`` (the service is registered with
``require_context``); the caller's identity decides what they see. Errors
leave as one clear message (a ``ValueError``/``PermissionError``/
``LookupError`` whose text names the argument or file), never a traceback
of ours, and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from cellpose_finetuning.data.artifacts import ArtifactFiles
from cellpose_finetuning.data.s3direct import S3Access
from cellpose_finetuning.engine.inference import ModelResolver
from cellpose_finetuning.engine.recipes import RECIPES
from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.engine.sessions import SessionStore
from cellpose_finetuning.scheduler import (
    FairGate,
    InferenceExecutor,
    LocalInference,
    SessionQueue,
    TrainingExecutor,
    TrainingQueue,
)
from cellpose_finetuning.service.auth import WorkspaceOwners
from cellpose_finetuning.service.config import ServiceConfig
from cellpose_finetuning.service.edge import api_method, inference_schema, scrub_paths
from cellpose_finetuning.service.inference import InferenceMethods
from cellpose_finetuning.service.jobs import (
    SWEEP_INTERVAL_S,
    InferenceJobs,
    delete_expired_results,
)
from cellpose_finetuning.service.payloads import MODEL_NAME
from cellpose_finetuning.service.publishing import PublishingMethods
from cellpose_finetuning.service.sessions import SessionMethods
from cellpose_finetuning.service.training import TrainingMethods, adopt_cached_files

__all__ = ["CellposeService", "ServiceConfig", "scrub_paths"]

log = logging.getLogger("cellpose_finetuning.service.api")


class CellposeService(InferenceMethods, TrainingMethods, SessionMethods, PublishingMethods):
    """The API object. Construct, ``await start()``, register its methods.

    Parameters
    ----------
    config : ServiceConfig
        Data directory and limits.
    artifact_manager : Any, optional
        hypha-rpc proxy of ``public/artifact-manager`` (the service's own,
        privileged connection); without it only sent arrays can be used.
    server_url : str, optional
        Public server URL, for links in results.
    inference : InferenceExecutor, optional
        Where ``infer`` runs; in this process by default, Ray Serve replicas
        with the Ray backend (:mod:`cellpose_finetuning.deploy.ray_backend`).
    training : TrainingExecutor, optional
        Where training runs; local worker processes by default, Ray tasks
        with the Ray backend.
    owners : WorkspaceOwners, optional
        Who owns which workspace (whose artifacts are trusted).
    s3 : S3Access, optional
        The store's S3 and keys (the embedded stack gives them): dataset files
        are then read straight from S3 after the same permission checks
        (``config.direct_s3_reads``); without it, through presigned URLs.
    """

    def __init__(
        self,
        config: ServiceConfig,
        artifact_manager: Any = None,
        server_url: str = "",
        *,
        inference: InferenceExecutor | None = None,
        training: TrainingExecutor | None = None,
        owners: WorkspaceOwners | None = None,
        s3: S3Access | None = None,
    ) -> None:
        self.config = config
        for folder in (config.sessions_dir, config.models_dir, config.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.sessions = SessionStore(config.sessions_dir)
        self.resolver = ModelResolver(models_dir=config.models_dir, sessions=self.sessions)
        self.inference: InferenceExecutor = inference or LocalInference(
            device=config.device, concurrency=config.inference_concurrency
        )
        self.queue: TrainingExecutor = training or TrainingQueue(
            config.max_concurrent_trainings, config.worker_threads
        )
        if isinstance(self.queue, SessionQueue):  # local and Ray: fair between users
            self.queue.time_slice_s = config.training_time_slice_s
        self.infer_gate = FairGate(
            config.inference_concurrency, config.max_waiting_infers_per_user, label="infer"
        )
        direct = None
        if s3 is not None and config.direct_s3_reads:
            from cellpose_finetuning.data.s3direct import DirectS3Reader

            direct = DirectS3Reader(s3)
        self.artifacts = (
            ArtifactFiles(
                artifact_manager,
                config.cache_dir,
                direct=direct,
                max_bytes=config.cache_max_bytes,
            )
            if artifact_manager
            else None
        )
        #: Whose artifacts are trusted in which workspace (see service/auth.py).
        self.owners = owners or WorkspaceOwners()
        if self.artifacts is not None:
            self.artifacts.owners = self.owners
        self.server_url = server_url.rstrip("/")
        self._prepare_tasks: dict[str, asyncio.Task[None]] = {}
        #: Block-wise infer jobs (service/jobs.py); their scratch files under data_dir/jobs.
        self.jobs = InferenceJobs(config.data_dir / "jobs")
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the queue and recover sessions left over by a previous run."""
        self.queue.start()
        for session in self.sessions:
            try:  # sessions from before the cache was bounded read from it: give them their own
                adopt_cached_files(session, self.config.cache_dir)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("session %s keeps reading from the cache: %s", session.id, exc)
            status = session.read_status()  # reconciles dead workers to "failed"
            if status.status_type in ("waiting", "preparing") and not status.worker_pid:
                session.update_status(
                    status_type="failed",
                    message="Interrupted by a service restart before training started; "
                    "continue it with restart_training.",
                )
        self.jobs.load()  # a restart keeps answering polls of earlier block-wise jobs
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        """Sweep now, then every :data:`SWEEP_INTERVAL_S` seconds, until closed."""
        while True:
            await self.sweep()
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def sweep(self) -> list[str]:
        """Delete expired job results and left-over job scratch folders; never raises.

        Returns
        -------
        list of str
            The result artifacts deleted.
        """
        try:
            self.jobs.clean_leftovers()
            if self.artifacts is None:
                return []
            return await delete_expired_results(
                self.artifacts.am,
                service_user=self.owners.service_user,
                ttl_s=self.config.job_result_ttl_hours * 3600.0,
            )
        except Exception:
            log.exception("sweeping expired job results failed; the next sweep tries again")
            return []

    async def close(self) -> None:
        """Stop the queue (running workers are asked to stop) and the inference executor."""
        for task in self._prepare_tasks.values():
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.jobs.close()
        await self.queue.close()
        await self.inference.close()
        if self.artifacts is not None and self.artifacts.direct is not None:
            self.artifacts.direct.close()

    def service_functions(self) -> dict[str, Callable[..., Any]]:
        """The methods to register, by name."""
        return {
            name: getattr(self, name)
            for name in dir(self)
            if getattr(getattr(self, name, None), "__is_api__", False)
        }

    @api_method
    async def list_pretrained_models(self, context: Any = None) -> list[str]:
        """List the pretrained models: 'cpsam' and the checkpoints this service offers by name."""
        return self.resolver.pretrained_names()

    @api_method
    async def get_training_capabilities(self, context: Any = None) -> dict[str, Any]:
        """Describe trainable models and every training parameter (type, default, bounds).

        Also "inference_parameters" (infer's and export_model's thresholds, same form) and
        "model_name_pattern" (export_model's model_name rule): the web page's forms use them.
        """
        import torch

        schema = TrainingSettings.model_json_schema()
        hidden = {"device", "checkpoint_interval_s", "model"}
        params = {}
        for name, prop in schema["properties"].items():
            if name in hidden:
                continue
            entry = {k: v for k, v in prop.items() if k not in ("title",)}
            if name == "n_epochs":
                entry["maximum"] = min(entry.get("maximum", 10**9), self.config.max_epochs)
            params[name] = entry
        return {
            "recipes": {name: r.model_dump() for name, r in RECIPES.items()},
            "models": [
                {"name": n, "family": "cellpose-sam", "trainable": True}
                for n in self.resolver.pretrained_names()
            ],
            "parameters": params,
            "inference_parameters": inference_schema(),
            "model_name_pattern": MODEL_NAME.pattern,
            "gpus": torch.cuda.device_count(),
            "max_concurrent_trainings": self.config.max_concurrent_trainings,
        }

    # ------------------------------------------------------------------ inference
