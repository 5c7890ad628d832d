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
import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from cellpose_finetuning.data.artifacts import ArtifactFiles, parse_artifact_id, upload_files
from cellpose_finetuning.data.pairing import check_specs, pair_files, safe_relpath, select_samples
from cellpose_finetuning.engine.inference import InferenceExecutor, LocalInference, ModelResolver
from cellpose_finetuning.engine.queue import TrainingExecutor, TrainingQueue
from cellpose_finetuning.engine.recipes import (
    RECIPES,
    apply_recipe,
    model_architecture,
    settings_warnings,
)
from cellpose_finetuning.engine.runs import (
    validate_settings,
    validation_error_message,
)
from cellpose_finetuning.engine.schemas import TERMINAL_STATES, InferenceSettings, TrainingSettings
from cellpose_finetuning.engine.sessions import (
    DataSpec,
    Session,
    SessionStore,
    atomic_write_json,
)
from cellpose_finetuning.engine.training import continue_session
from cellpose_finetuning.errors import (
    CellposeFinetuningError,
    Forbidden,
    InvalidInput,
    NotFound,
    ResourceLimit,
)
from cellpose_finetuning.io.images import read_image, to_canonical
from cellpose_finetuning.service.auth import Caller, caller_from_context, can_read

__all__ = ["CellposeService", "ServiceConfig"]

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: The contract's default collection for exported models.
DEFAULT_COLLECTION = "bioimage-io/colab-annotations"


class ServiceConfig(BaseModel):
    """Where the service keeps its state, and its limits."""

    data_dir: Path
    max_concurrent_trainings: int = Field(1, ge=1)
    max_active_sessions_per_user: int = Field(3, ge=1)
    max_epochs: int = Field(1000, ge=1)
    max_pixels: int = Field(64 * 1024 * 1024, ge=1, description="Per image, all axes.")
    max_files: int = Field(50_000, ge=1, description="Files per dataset listing.")
    max_images_per_call: int = Field(64, ge=1)
    worker_threads: int | None = Field(None, description="Torch threads per training worker.")
    inference_concurrency: int = Field(1, ge=1)
    device: str | None = None

    @property
    def sessions_dir(self) -> Path:
        """Training sessions."""
        return self.data_dir / "sessions"

    @property
    def models_dir(self) -> Path:
        """Checkpoints offered by name (file stem)."""
        return self.data_dir / "models"

    @property
    def cache_dir(self) -> Path:
        """Downloaded dataset files."""
        return self.data_dir / "cache"


def _public_error(exc: Exception) -> Exception:
    """Map an internal error to what the remote caller sees."""
    if isinstance(exc, InvalidInput | ResourceLimit):
        return ValueError(str(exc))
    if isinstance(exc, NotFound):
        return LookupError(str(exc))
    if isinstance(exc, Forbidden):
        return PermissionError(str(exc))
    if isinstance(exc, CellposeFinetuningError):
        return RuntimeError(str(exc))
    if isinstance(exc, ValidationError):
        arg, reason = validation_error_message(exc)
        return ValueError(f"{arg}: {reason}")
    log.exception("internal error")
    return RuntimeError(f"internal error ({type(exc).__name__}); the service keeps running")


def api_method(func: F) -> F:
    """Wrap a service method: kwargs given as one dict, and clear errors."""

    @functools.wraps(func)
    async def wrapper(self: CellposeService, *args: Any, context: Any = None, **kwargs: Any) -> Any:
        # hypha-rpc JS clients may pass all arguments as one dict.
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            kwargs, args = dict(args[0]), ()
        kwargs.pop("_rkwargs", None)
        try:
            return await func(self, *args, context=context, **kwargs)
        except TypeError as exc:
            if "argument" in str(exc):
                raise ValueError(f"{func.__name__}: {exc}") from None
            raise _public_error(exc) from None
        except Exception as exc:
            raise _public_error(exc) from None

    wrapper.__is_api__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _with_warnings(out: dict[str, Any], settings: TrainingSettings, model: str) -> dict[str, Any]:
    """Add "warnings" to start_training's answer when the settings cannot change the model."""
    warnings = settings_warnings(settings, arch=model_architecture(model))
    if warnings:
        out["warnings"] = warnings
    return out


def _status_dict(session: Session, status: Any = None) -> dict[str, Any]:
    st = status or session.read_status()
    out = st.model_dump(mode="json", exclude={"worker_pid", "worker_create_time", "worker_host"})
    out["session_id"] = session.id
    return out


class CellposeService:
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
    """

    def __init__(
        self,
        config: ServiceConfig,
        artifact_manager: Any = None,
        server_url: str = "",
        *,
        inference: InferenceExecutor | None = None,
        training: TrainingExecutor | None = None,
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
        self.artifacts = (
            ArtifactFiles(artifact_manager, config.cache_dir) if artifact_manager else None
        )
        self.server_url = server_url.rstrip("/")
        self._prepare_tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Start the queue and recover sessions left over by a previous run."""
        self.queue.start()
        for session in self.sessions:
            status = session.read_status()  # reconciles dead workers to "failed"
            if status.status_type in ("waiting", "preparing") and not status.worker_pid:
                session.update_status(
                    status_type="failed",
                    message="Interrupted by a service restart before training started; "
                    "continue it with restart_training.",
                )

    async def close(self) -> None:
        """Stop the queue (running workers are asked to stop) and the inference executor."""
        for task in self._prepare_tasks.values():
            task.cancel()
        await self.queue.close()
        await self.inference.close()

    def service_functions(self) -> dict[str, Callable[..., Any]]:
        """The methods to register, by name."""
        return {
            name: getattr(self, name)
            for name in dir(self)
            if getattr(getattr(self, name, None), "__is_api__", False)
        }

    # ------------------------------------------------------------------ helpers
    def _session(self, session_id: Any, caller: Caller) -> Session:
        if not isinstance(session_id, str):
            raise InvalidInput("session_id", "must be a string")
        caller.require_login("training sessions")
        return self.sessions.get(session_id, owner=caller.id)

    async def _readable_artifact(self, artifact: str, caller: Caller) -> str:
        artifact_id = parse_artifact_id(artifact)
        if self.artifacts is None:
            raise InvalidInput("artifact", "this service has no artifact store")
        record = await self.artifacts.read(artifact_id)
        parent = None
        if record.get("parent_id"):
            try:
                parent = await self.artifacts.read(record["parent_id"])
            except CellposeFinetuningError:
                parent = None
        if not can_read(caller, record, parent):
            # Do not reveal whether it exists.
            raise NotFound("artifact", artifact_id, "Or you may not read it.")
        return artifact_id

    # ------------------------------------------------------------------ models
    @api_method
    async def list_pretrained_models(self, context: Any = None) -> list[str]:
        """List the pretrained models: 'cpsam' and the checkpoints this service offers by name."""
        return self.resolver.pretrained_names()

    @api_method
    async def get_training_capabilities(self, context: Any = None) -> dict[str, Any]:
        """Describe trainable models and every training parameter (type, default, bounds)."""
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
            "gpus": torch.cuda.device_count(),
            "max_concurrent_trainings": self.config.max_concurrent_trainings,
        }

    # ------------------------------------------------------------------ inference
    @api_method
    async def infer(
        self,
        model: str = "cpsam",
        artifact: str | None = None,
        image_paths: list[str] | None = None,
        input_arrays: list[Any] | None = None,
        diameter: float | None = None,
        flow_threshold: float = 0.4,
        cellprob_threshold: float = 0.0,
        niter: int | None = None,
        context: Any = None,
    ) -> list[dict[str, Any]]:
        """Segment images. Returns one dict per image with key "output" (uint16/uint32 labels).

        model: "cpsam", a checkpoint name, or one of your training session ids.
        artifact + image_paths: images in a dataset artifact you may read.
        input_arrays: numpy arrays (C,H,W) or (H,W).
        diameter: object diameter in pixels; None means no rescaling (cellpose 4 has no size model).
        """
        caller = caller_from_context(context)
        settings = InferenceSettings(
            diameter=diameter,
            flow_threshold=flow_threshold,
            cellprob_threshold=cellprob_threshold,
            niter=niter,
        )
        if (input_arrays is None) == (image_paths is None):
            raise InvalidInput("input_arrays", "give either input_arrays or artifact + image_paths")
        if caller.is_anonymous and (model != "cpsam" or input_arrays is None):
            raise Forbidden("anonymous callers may only run model 'cpsam' on input_arrays")
        ref = self.resolver.resolve(model, owner=caller.id)
        images: list[np.ndarray] = []
        names: list[str] = []
        if input_arrays is not None:
            if not isinstance(input_arrays, list | tuple) or not input_arrays:
                raise InvalidInput("input_arrays", "must be a non-empty list of arrays")
            if len(input_arrays) > self.config.max_images_per_call:
                raise ResourceLimit(
                    f"input_arrays: at most {self.config.max_images_per_call} images per call"
                )
            for i, arr in enumerate(input_arrays):
                name = f"input_arrays[{i}]"
                if not isinstance(arr, np.ndarray):
                    raise InvalidInput(name, f"expected a numpy array, got {type(arr).__name__}")
                self._check_pixels(arr.shape, name)
                img = to_canonical(arr, "YX" if arr.ndim == 2 else None, name=name)
                if not np.all(np.isfinite(img)):
                    raise InvalidInput(name, "contains NaN or infinite values")
                images.append(img)
                names.append(name)
        else:
            if artifact is None:
                raise InvalidInput("artifact", "needed with image_paths")
            if not isinstance(image_paths, list | tuple) or not image_paths:
                raise InvalidInput("image_paths", "must be a non-empty list of paths")
            if len(image_paths) > self.config.max_images_per_call:
                raise ResourceLimit(
                    f"image_paths: at most {self.config.max_images_per_call} per call"
                )
            paths = [safe_relpath(p, f"image_paths[{i}]") for i, p in enumerate(image_paths)]
            artifact_id = await self._readable_artifact(artifact, caller)
            assert self.artifacts is not None
            local = await self.artifacts.download(artifact_id, paths)
            for p in paths:
                images.append(read_image(local[p], max_pixels=self.config.max_pixels))
                names.append(p)
        masks = await self.inference.segment(ref, images, names, settings)
        return [{"output": m} for m in masks]

    def _check_pixels(self, shape: tuple[int, ...], name: str) -> None:
        if int(np.prod(shape, dtype="float64")) > self.config.max_pixels:
            raise ResourceLimit(
                f"{name}: {shape} has more than the limit of {self.config.max_pixels:,} values"
            )

    # ------------------------------------------------------------------ training
    @api_method
    async def start_training(
        self,
        artifact: str,
        train_images: str,
        train_annotations: str,
        test_images: str | None = None,
        test_annotations: str | None = None,
        model: str = "cpsam",
        n_epochs: int = 10,
        n_samples: int | None = None,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0001,
        validation_interval: int | None = None,
        context: Any = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Start fine-tuning on a dataset artifact. Returns the status with "session_id".

        train_images/train_annotations: two folders ending in "/" (same file names) or two
        patterns with one "*" whose matched parts must be equal ("images/*.tif",
        "annotations/*_mask.tif"). test_images/test_annotations: the same, for validation.
        Extra settings: batch_size, min_train_masks, lr_schedule, warmup_epochs, seed,
        nimg_per_epoch, sampling, recipe ("contract", "cellpose", "from-scratch": named settings;
        values you give win, the contract's defaults do not). "warnings" lists reasons the run
        may not change the model.
        """
        caller = caller_from_context(context)
        caller.require_login("start_training")
        if (test_images is None) != (test_annotations is None):
            missing = "test_annotations" if test_annotations is None else "test_images"
            raise InvalidInput(missing, "test_images and test_annotations must be given together")
        allowed_extra = {"batch_size", "min_train_masks", "lr_schedule", "warmup_epochs", "seed"}
        allowed_extra |= {"nimg_per_epoch", "sampling", "recipe"}
        unknown = set(extra) - allowed_extra
        if unknown:
            raise InvalidInput(sorted(unknown)[0], "unknown argument")
        if isinstance(n_epochs, int) and n_epochs > self.config.max_epochs:
            raise ResourceLimit(f"n_epochs: at most {self.config.max_epochs} on this service")
        settings = validate_settings(
            apply_recipe(
                dict(
                    model=model,
                    n_epochs=n_epochs,
                    n_samples=n_samples,
                    learning_rate=learning_rate,
                    weight_decay=weight_decay,
                    validation_interval=validation_interval,
                    **extra,
                )
            ),
            has_test_data=test_images is not None,
        )
        base = self.resolver.resolve(settings.model, owner=caller.id)
        settings = settings.model_copy(update={"model": base.source})
        active = [
            s
            for s in self.sessions.list(owner=caller.id)
            if s.read_status().status_type not in TERMINAL_STATES
        ]
        if len(active) >= self.config.max_active_sessions_per_user:
            raise ResourceLimit(
                f"you already have {len(active)} active training sessions "
                f"(limit {self.config.max_active_sessions_per_user}); stop one first"
            )
        specs = {"train_images": train_images, "train_annotations": train_annotations}
        if test_images is not None:
            specs.update(test_images=test_images, test_annotations=test_annotations)
        for arg, spec in specs.items():
            if not isinstance(spec, str):
                raise InvalidInput(arg, "must be a string")
        check_specs(train_images, train_annotations)
        if test_images is not None and test_annotations is not None:
            check_specs(
                test_images,
                test_annotations,
                images_arg="test_images",
                annotations_arg="test_annotations",
            )
        artifact_id = await self._readable_artifact(artifact, caller)
        session = self.sessions.create(
            settings,
            DataSpec(train=[], dataset_artifact_id=artifact_id, source=specs),
            owner=caller.id,
            message="Preparing: listing the dataset",
        )
        session.update_status(status_type="preparing", model=model)
        task = asyncio.get_running_loop().create_task(self._prepare(session, artifact_id, specs))
        self._prepare_tasks[session.id] = task
        task.add_done_callback(lambda _t: self._prepare_tasks.pop(session.id, None))
        return _with_warnings(_status_dict(session), settings, base.source)

    async def _prepare(self, session: Session, artifact_id: str, specs: dict[str, str]) -> None:
        """List, pair and download the data, then queue the session."""
        assert self.artifacts is not None
        try:
            names = await self.artifacts.list_specs(artifact_id, specs.values())
            if len(names) > self.config.max_files:
                raise ResourceLimit(
                    f"the dataset lists {len(names)} files (limit {self.config.max_files})"
                )
            train = pair_files(specs["train_images"], specs["train_annotations"], names)
            test = []
            if "test_images" in specs:
                test = pair_files(
                    specs["test_images"],
                    specs["test_annotations"],
                    names,
                    images_arg="test_images",
                    annotations_arg="test_annotations",
                )
            settings = session.settings
            train = select_samples(train, settings.n_samples, settings.seed)
            wanted = [p for pair in (*train, *test) for p in (pair.image, pair.annotation)]

            def progress(done: int, total: int) -> None:
                if done == total or done % 50 == 0:
                    session.update_status(
                        message=f"Preparing: downloaded {done}/{total} files "
                        f"({len(train)} training pairs, {len(test)} test pairs)"
                    )

            local = await self.artifacts.download(artifact_id, wanted, progress=progress)
            data = DataSpec(
                train=[(str(local[p.image]), str(local[p.annotation])) for p in train],
                test=[(str(local[p.image]), str(local[p.annotation])) for p in test],
                dataset_artifact_id=artifact_id,
                source={**specs, "n_available": len(names)},
            )
            atomic_write_json(session.path / "data.json", data.to_json())
            session.update_status(n_train=len(train), n_test=len(test))
            self.queue.submit(session)
        except asyncio.CancelledError:
            # Only stop_training and shutdown cancel this task.
            session.update_status(status_type="stopped", message="Stopped before training started")
            raise
        except Exception as exc:
            message = (
                str(_public_error(exc))
                if not isinstance(exc, CellposeFinetuningError)
                else str(exc)
            )
            session.update_status(
                status_type="failed", message=f"Preparing the data failed: {message}"
            )

    @api_method
    async def get_training_status(self, session_id: str, context: Any = None) -> dict[str, Any]:
        """Status of one of your training sessions (status_type, message, losses, metrics...)."""
        session = self._session(session_id, caller_from_context(context))
        return _status_dict(session)

    @api_method
    async def stop_training(self, session_id: str, context: Any = None) -> dict[str, Any]:
        """Stop one of your training sessions after the current batch, keeping its weights."""
        session = self._session(session_id, caller_from_context(context))
        status = session.read_status()
        if status.status_type in TERMINAL_STATES:
            return _status_dict(session, status)
        task = self._prepare_tasks.get(session.id)
        if task is not None:
            task.cancel()
        if self.queue.cancel(session.id) or task is not None:
            session.update_status(status_type="stopped", message="Stopped before training started")
            return _status_dict(session)
        session.request_stop()
        return _status_dict(session)

    @api_method
    async def restart_training(
        self, session_id: str, n_epochs: int | None = None, context: Any = None
    ) -> dict[str, Any]:
        """Continue one of your sessions from its last weights (and optimizer state)."""
        session = self._session(session_id, caller_from_context(context))
        if not session.data.train:
            raise InvalidInput("session_id", "this session never got its data; start a new one")
        continue_session(session, n_epochs)
        self.queue.submit(session, resume=True)
        return _status_dict(session)

    @api_method
    async def list_training_sessions(self, context: Any = None) -> list[dict[str, Any]]:
        """Your training sessions, oldest first, with their status."""
        caller = caller_from_context(context)
        caller.require_login("list_training_sessions")
        out = []
        for session in self.sessions.list(owner=caller.id):
            st = session.read_status()
            out.append(
                {
                    "session_id": session.id,
                    "status_type": st.status_type,
                    "message": st.message,
                    "model": st.model,
                    "dataset_artifact_id": st.dataset_artifact_id,
                    "current_epoch": st.current_epoch,
                    "total_epochs": st.total_epochs,
                    "start_time": st.start_time,
                }
            )
        return out

    @api_method
    async def delete_training_session(self, session_id: str, context: Any = None) -> dict[str, Any]:
        """Delete one of your sessions that is not running."""
        caller = caller_from_context(context)
        session = self._session(session_id, caller)
        if self.queue.is_running(session.id) or session.id in self._prepare_tasks:
            raise InvalidInput("session_id", "the session is running; stop it first")
        self.queue.cancel(session.id)
        self.sessions.delete(session.id, owner=caller.id)
        return {"session_id": session_id, "deleted": True}

    # ------------------------------------------------------------------ export
    async def _collection(self, collection: str, arg: str = "collection") -> dict[str, Any]:
        collection_id = parse_artifact_id(collection, arg)
        if self.artifacts is None:
            raise InvalidInput(arg, "this service has no artifact store")
        record = await self.artifacts.read(collection_id)
        if record.get("type") != "collection":
            raise InvalidInput(arg, f"{collection_id!r} is not a collection")
        return record

    @api_method
    async def export_model(
        self,
        session_id: str,
        model_name: str,
        collection: str = DEFAULT_COLLECTION,
        checkpoint: str = "best",
        license: str | None = None,
        flow_threshold: float = 0.4,
        cellprob_threshold: float = 0.0,
        context: Any = None,
    ) -> dict[str, Any]:
        """Export one of your sessions as a BioImage.IO model into a collection.

        Returns artifact_id, model_name, status ("exported"), artifact_url, download_url (zip)
        and files. The package is validated with bioimageio.spec before anything is uploaded.
        flow_threshold/cellprob_threshold are baked into the exported model.
        """
        import tempfile

        from cellpose_finetuning.errors import Conflict
        from cellpose_finetuning.export.bioimageio import build_package
        from cellpose_finetuning.service.auth import can_write_children

        caller = caller_from_context(context)
        session = self._session(session_id, caller)
        status = session.read_status()
        if status.status_type not in ("completed", "stopped"):
            raise InvalidInput(
                "session_id",
                f"session {session.id!r} is {status.status_type}; "
                "only completed or stopped sessions can be exported",
            )
        if not isinstance(model_name, str) or not re.fullmatch(
            r"[a-z0-9][a-z0-9-]{2,62}", model_name
        ):
            raise InvalidInput(
                "model_name", f"use 3-63 lowercase letters, digits and hyphens (got {model_name!r})"
            )
        record = await self._collection(collection)
        if not can_write_children(caller, record):
            raise Forbidden(f"collection {collection!r}: you may not add models to it")
        workspace = record["workspace"]
        alias_id = f"{workspace}/{model_name}"
        try:
            await self.artifacts.read(alias_id)  # type: ignore[union-attr]
        except NotFound:
            pass
        else:
            raise Conflict(f"model_name: {alias_id!r} already exists; choose another name")
        inference = InferenceSettings(
            flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold
        )
        am = self.artifacts.am  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(prefix="cpft-export-") as tmp:
            result = await asyncio.to_thread(
                build_package,
                session,
                Path(tmp) / "pkg",
                checkpoint=checkpoint,
                model_name=model_name,
                license=license,
                inference=inference,
                authors=[caller.id],
            )
            import yaml

            manifest = yaml.safe_load((result.path / "rdf.yaml").read_text())
            manifest["training_dataset_id"] = status.dataset_artifact_id
            manifest["exported_by"] = caller.id
            manifest["session_id"] = session.id
            art = await am.create(
                parent_id=record["id"],
                alias=model_name,
                type="model",
                stage=True,
                manifest=manifest,
                config={"training_dataset_id": status.dataset_artifact_id},
            )
            names = await upload_files(
                am, art["id"], {p.name: p for p in result.path.iterdir() if p.is_file()}
            )
        url = f"{self.server_url}/{workspace}/artifacts/{model_name}"
        return {
            "artifact_id": art["id"],
            "model_name": model_name,
            "status": "exported",
            "artifact_url": url,
            "download_url": f"{url}/create-zip-file",
            "files": names,
        }

    @api_method
    async def list_models_by_dataset(
        self, dataset_id: str, collection: str = DEFAULT_COLLECTION, context: Any = None
    ) -> list[dict[str, Any]]:
        """Models in a collection trained on a dataset: id, name, created_at, url; newest first."""
        dataset_id = parse_artifact_id(dataset_id, "dataset_id")
        record = await self._collection(collection)
        am = self.artifacts.am  # type: ignore[union-attr]
        out, offset, page = [], 0, 1000
        while True:
            items = await am.list(
                record["id"],
                filters={"manifest": {"training_dataset_id": dataset_id}},
                offset=offset,
                limit=page,
                order_by="created_at>",
            )
            items = list(items)
            for item in items:
                alias = item.get("alias") or item["id"].split("/")[-1]
                out.append(
                    {
                        "id": item["id"],
                        "name": (item.get("manifest") or {}).get("name", alias),
                        "created_at": item.get("created_at"),
                        "url": f"{self.server_url}/{item['workspace']}/artifacts/{alias}",
                    }
                )
            if len(items) < page:
                break
            offset += page
        out.sort(key=lambda m: m["created_at"] or 0, reverse=True)
        return out

    # ------------------------------------------------------------------ evaluation
    @api_method
    async def evaluate(
        self,
        models: list[str],
        artifact: str,
        test_images: str,
        test_annotations: str,
        diameter: float | None = None,
        flow_threshold: float = 0.4,
        cellprob_threshold: float = 0.0,
        pictures: bool = True,
        context: Any = None,
    ) -> dict[str, Any]:
        """Score models on a labelled dataset: did fine-tuning help?

        models: names as for infer ("cpsam", a checkpoint name, your session ids), up to 8.
        artifact + test_images/test_annotations: a dataset you may read, paired as in
        start_training. Every model segments every image with the same settings.
        Returns "report" (per model: AP at IoU 0.5/0.75/0.9, precision/recall/F1 at 0.5,
        n_true, n_pred, and the same per image), "markdown" (the tables) and, with
        pictures, "per_image_ap_png" (bar chart) and "overlays_png" (image, ground truth,
        each model) as PNG bytes.
        """
        from cellpose_finetuning.engine.evaluation import (
            load_labelled,
            report_pictures,
            score_predictions,
        )

        caller = caller_from_context(context)
        caller.require_login("evaluate")
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list | tuple) or not models:
            raise InvalidInput("models", "must be a non-empty list of model names")
        if len(models) > 8:
            raise ResourceLimit("models: at most 8 models per call")
        settings = InferenceSettings(
            diameter=diameter, flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold
        )
        refs = [self.resolver.resolve(m, owner=caller.id) for m in models]
        for arg, spec in (("test_images", test_images), ("test_annotations", test_annotations)):
            if not isinstance(spec, str):
                raise InvalidInput(arg, "must be a string")
        check_specs(
            test_images,
            test_annotations,
            images_arg="test_images",
            annotations_arg="test_annotations",
        )
        artifact_id = await self._readable_artifact(artifact, caller)
        assert self.artifacts is not None
        names = await self.artifacts.list_specs(artifact_id, [test_images, test_annotations])
        pairs = pair_files(
            test_images,
            test_annotations,
            names,
            images_arg="test_images",
            annotations_arg="test_annotations",
        )
        if len(pairs) > self.config.max_images_per_call:
            raise ResourceLimit(
                f"test_images: {len(pairs)} pairs; at most {self.config.max_images_per_call} "
                "per evaluation"
            )
        local = await self.artifacts.download(
            artifact_id, [p for pair in pairs for p in (pair.image, pair.annotation)]
        )
        for pair in pairs:
            read_image(local[pair.image], max_pixels=self.config.max_pixels)  # size check
        data = await asyncio.to_thread(
            load_labelled,
            [(local[p.image], local[p.annotation]) for p in pairs],
            [p.image for p in pairs],
        )
        images = [img for _, img, _ in data]
        predictions, seconds = {}, {}
        for name, ref in zip(models, refs, strict=True):
            t0 = asyncio.get_running_loop().time()
            predictions[name] = await self.inference.segment(
                ref, images, [n for n, _, _ in data], settings
            )
            seconds[name] = asyncio.get_running_loop().time() - t0
        report = await asyncio.to_thread(score_predictions, predictions, data, settings, seconds)
        out: dict[str, Any] = {
            "report": report.model_dump(mode="json"),
            "markdown": report.to_markdown(),
        }
        if pictures:
            pngs = await asyncio.to_thread(report_pictures, report, data, predictions)
            out["per_image_ap_png"] = pngs["bars"]
            out["overlays_png"] = pngs["overlays"]
        return out
