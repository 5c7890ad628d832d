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
import posixpath
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from cellpose_finetuning.data.artifacts import ArtifactFiles, parse_artifact_id, upload_files
from cellpose_finetuning.data.metadata import load_metadata_document, pairs_from_metadata
from cellpose_finetuning.data.pairing import (
    Pair,
    check_specs,
    pair_files,
    resolve_n_samples,
    safe_relpath,
    select_samples,
    spec_dir,
)
from cellpose_finetuning.engine.inference import (
    ModelRef,
    ModelResolver,
    Segmentation,
    check_input_size,
)
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
from cellpose_finetuning.engine.schemas import (
    TERMINAL_STATES,
    InferenceSettings,
    TrainingSettings,
    public_status,
)
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
from cellpose_finetuning.scheduler import (
    FairGate,
    InferenceExecutor,
    LocalInference,
    SessionQueue,
    TrainingExecutor,
    TrainingQueue,
)
from cellpose_finetuning.service.auth import (
    Caller,
    WorkspaceOwners,
    caller_from_context,
    can_read,
    readable_artifact,
    writable_collection,
)
from cellpose_finetuning.service.payloads import (
    MODEL_NAME,
    default_model_name,
    encode_mask_png,
    normalize_authors,
    normalize_uploader,
)

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
    max_sessions_per_user: int = Field(
        100, ge=1, description="Sessions a user may keep (any state); delete old ones for more."
    )
    max_waiting_infers_per_user: int = Field(
        32,
        ge=1,
        description="infer calls of one user that may wait for a slot (a client sending 20 "
        "images as 20 calls at once is normal; the order stays fair whatever the cap).",
    )
    training_time_slice_s: float | None = Field(
        60.0,
        ge=0,
        description="Seconds a training keeps its slot before it pauses (after its epoch) "
        "for another user's waiting session; None: never.",
    )

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


def scrub_paths(text: str, data_dir: Path) -> str:
    """Take the server's own paths out of a message for a remote caller.

    A cached dataset file (``<data-dir>/cache/<id>/<version>/<path>``) is
    named by its path in the dataset; anything else under the data directory
    by ``<data-dir>/...``.
    """
    root = re.escape(str(data_dir))
    text = re.sub(root + r"/cache/[^/\s'\"]+/[^/\s'\"]+/", "", text)
    return re.sub(root, "<data-dir>", text)


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
            err = _public_error(exc)
        except Exception as exc:
            err = _public_error(exc)
        raise type(err)(scrub_paths(str(err), self.config.data_dir)) from None

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
    out = public_status(st, owner=session.owner)
    out["session_id"] = session.id
    if out.get("message"):
        out["message"] = scrub_paths(out["message"], session.path.parents[1])
    return out


def _session_arg(session_id: Any) -> Any:
    """The original accepted ``<path>/<id>/status.json``: keep the id (other ids as given)."""
    if isinstance(session_id, str) and session_id.strip().endswith("/status.json"):
        value = session_id.strip().removesuffix("/status.json")
        return value.rsplit("/", 1)[-1]
    return session_id


def _is_artifact_ref(model: str) -> bool:
    """Whether a ``model`` argument names a published model artifact (``ws/alias`` or URL)."""
    return model.startswith(("http://", "https://")) or model.count("/") == 1


#: Names of the weights file in a published model artifact, in order of preference
#: (ours is model_weights.pth; the others are what the original looked for).
_WEIGHT_FILES = ("model_weights.pth", "model.pth", "weights.pth")
#: Status filter values accepted by list_training_sessions.
_STATUS_TYPES = frozenset({"waiting", "preparing", "running", "completed", "failed", "stopped"})


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
        owners: WorkspaceOwners | None = None,
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
        self.artifacts = (
            ArtifactFiles(artifact_manager, config.cache_dir) if artifact_manager else None
        )
        #: Whose artifacts are trusted in which workspace (see service/auth.py).
        self.owners = owners or WorkspaceOwners()
        if self.artifacts is not None:
            self.artifacts.owners = self.owners
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
        session_id = _session_arg(session_id)
        if not isinstance(session_id, str):
            raise InvalidInput("session_id", "must be a string")
        caller.require_login("training sessions")
        return self.sessions.get(session_id, owner=caller.id)

    async def _readable_artifact(self, artifact: str, caller: Caller) -> str:
        return (await readable_artifact(self.artifacts, artifact, caller))["id"]

    async def _published_model(self, model: str, caller: Caller) -> ModelRef:
        """A model exported to an artifact, downloaded once per artifact version."""
        record = await readable_artifact(self.artifacts, model, caller, arg="model", kind="model")
        artifact_id = record["id"]
        if record.get("type") != "model":
            raise InvalidInput(
                "model",
                f"{artifact_id!r} is a {record.get('type') or 'plain'} artifact, not a model",
            )
        assert self.artifacts is not None
        files = await self.artifacts.list_dir(artifact_id, "")
        weights = next((f for f in _WEIGHT_FILES if f in files), None) or next(
            (f for f in sorted(files) if f.endswith(".pth")), None
        )
        if weights is None:
            raise InvalidInput("model", f"{artifact_id!r} holds no .pth weights")
        stamp = re.sub(r"[^A-Za-z0-9_.-]", "_", str(record.get("last_modified") or "0"))
        dest = (
            self.config.models_dir
            / "published"
            / artifact_id.replace("/", "__")
            / stamp
            / Path(weights).name
        )
        if not dest.is_file():
            await self.artifacts.fetch_file(artifact_id, weights, dest)
        return ModelRef(artifact_id, str(dest), "published")

    async def _resolve_model(self, model: Any, caller: Caller) -> ModelRef:
        """Pretrained names, checkpoints, your sessions, or a published model artifact."""
        if isinstance(model, str) and _is_artifact_ref(model.strip()) and self.artifacts:
            if caller.is_anonymous:
                raise Forbidden("anonymous callers may only run model 'cpsam' on input_arrays")
            return await self._published_model(model.strip(), caller)
        return self.resolver.resolve(model, owner=caller.id)

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
        artifact: str | None = None,
        image_paths: list[str] | None = None,
        input_arrays: list[Any] | None = None,
        model: str = "cpsam",
        diameter: float | None = None,
        flow_threshold: float = 0.4,
        cellprob_threshold: float = 0.0,
        niter: int | None = None,
        return_flows: bool = False,
        return_flows_only: bool = False,
        json_safe: bool = False,
        enable_clahe: bool = False,
        context: Any = None,
    ) -> list[dict[str, Any]]:
        """Segment images. Returns one dict per image: "input_path" and "output" (labels).

        artifact + image_paths: images in a dataset artifact you may read.
        input_arrays: numpy arrays (C,H,W) or (H,W) (or (H,W,3) RGB).
        model: "cpsam", a checkpoint name, one of your training session ids, or a
        model artifact exported by this service ("workspace/alias" or its URL).
        diameter: object diameter in pixels; None means no rescaling (cellpose 4 has no size model).
        return_flows: add "flows" = [HSV flow picture, dP (2,H,W), cell probability (H,W)].
        return_flows_only: "output" is {"dP", "cellprob"}; no masks, thresholds unused.
        json_safe: "output" is a PNG overlay {"encoding": "mask_png_base64", "width",
        "height", "object_count", "png_base64"} for browsers.
        enable_clahe: contrast-limited histogram equalisation first (grey image).
        """
        caller = caller_from_context(context)
        settings = InferenceSettings(
            diameter=diameter,
            flow_threshold=flow_threshold,
            cellprob_threshold=cellprob_threshold,
            niter=niter,
            enable_clahe=bool(enable_clahe),
            return_flows=bool(return_flows),
            compute_masks=not bool(return_flows_only),
        )
        if (input_arrays is None) == (image_paths is None):
            raise InvalidInput("input_arrays", "give either input_arrays or artifact + image_paths")
        if model is None or model == "":
            model = "cpsam"
        if caller.is_anonymous and (model != "cpsam" or input_arrays is None):
            raise Forbidden("anonymous callers may only run model 'cpsam' on input_arrays")
        ref = await self._resolve_model(model, caller)
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
            record = await readable_artifact(self.artifacts, artifact, caller)
            assert self.artifacts is not None
            local = await self.artifacts.download(record["id"], paths, record=record)
            for p in paths:
                images.append(read_image(local[p], max_pixels=self.config.max_pixels))
                names.append(p)
        for img, name in zip(images, names, strict=True):
            check_input_size(img, settings.diameter, self.config.max_pixels, name=name)
        async with self.infer_gate.slot(caller.id):  # round robin between users
            results = await self.inference.segment(ref, images, names, settings)
        return [
            self._result_item(name, result, settings, bool(json_safe))
            for name, result in zip(names, results, strict=True)
        ]

    @staticmethod
    def _result_item(
        name: str, result: Any, settings: InferenceSettings, json_safe: bool
    ) -> dict[str, Any]:
        """One image's answer in the original's shape."""
        if not isinstance(result, Segmentation):
            result = Segmentation(masks=result)
        item: dict[str, Any] = {"input_path": name}
        if not settings.compute_masks:
            assert result.flows is not None
            dp, cellprob = result.flows[1], result.flows[2]
            item["output"] = {
                "dP": np.ascontiguousarray(dp, dtype="float32"),
                "cellprob": np.ascontiguousarray(cellprob, dtype="float32"),
            }
            return item
        assert result.masks is not None
        item["output"] = encode_mask_png(result.masks) if json_safe else result.masks
        if settings.return_flows and result.flows is not None:
            item["flows"] = [np.ascontiguousarray(f) for f in result.flows]
        return item

    def _check_pixels(self, shape: tuple[int, ...], name: str) -> None:
        if int(np.prod(shape, dtype="float64")) > self.config.max_pixels:
            raise ResourceLimit(
                f"{name}: {shape} has more than the limit of {self.config.max_pixels:,} values"
            )

    # ------------------------------------------------------------------ training
    def _check_data_args(
        self,
        train_images: Any,
        train_annotations: Any,
        metadata_dir: Any,
        test_images: Any,
        test_annotations: Any,
    ) -> dict[str, str]:
        """Check the pairing arguments; returns the specs given (metadata_dir included)."""
        if (test_images is None) != (test_annotations is None):
            missing = "test_annotations" if test_annotations is None else "test_images"
            raise InvalidInput(missing, "test_images and test_annotations must be given together")
        if metadata_dir is None and (train_images is None or train_annotations is None):
            missing = "train_images" if train_images is None else "train_annotations"
            raise InvalidInput(missing, "give train_images and train_annotations, or metadata_dir")
        if (train_images is None) != (train_annotations is None):
            missing = "train_annotations" if train_annotations is None else "train_images"
            raise InvalidInput(missing, "train_images and train_annotations go together")
        specs: dict[str, str] = {}
        for arg, spec in (
            ("train_images", train_images),
            ("train_annotations", train_annotations),
            ("test_images", test_images),
            ("test_annotations", test_annotations),
            ("metadata_dir", metadata_dir),
        ):
            if spec is None:
                continue
            if not isinstance(spec, str) or not spec.strip():
                raise InvalidInput(arg, "must be a non-empty string")
            specs[arg] = spec
        if "metadata_dir" in specs:
            specs["metadata_dir"] = safe_relpath(
                specs["metadata_dir"].rstrip("/") + "/", "metadata_dir"
            )
        if "train_images" in specs:
            check_specs(specs["train_images"], specs["train_annotations"])
        if "test_images" in specs:
            check_specs(
                specs["test_images"],
                specs["test_annotations"],
                images_arg="test_images",
                annotations_arg="test_annotations",
            )
        return specs

    async def _resolve_pairs(
        self, artifact_id: str, specs: dict[str, str]
    ) -> tuple[list[Pair], list[Pair], int]:
        """List the dataset and pair its files: (train, test, files listed)."""
        assert self.artifacts is not None
        pattern_specs = [v for k, v in specs.items() if k != "metadata_dir"]
        names = await self.artifacts.list_specs(artifact_id, pattern_specs) if pattern_specs else []
        train: list[Pair] = []
        test: list[Pair] = []
        if "metadata_dir" in specs:
            train, test, listed = await self._metadata_pairs(artifact_id, specs["metadata_dir"])
            names = list(dict.fromkeys([*names, *listed]))
        if len(names) > self.config.max_files:
            raise ResourceLimit(
                f"the dataset lists {len(names)} files (limit {self.config.max_files})"
            )
        if not train and "train_images" in specs:
            train = pair_files(specs["train_images"], specs["train_annotations"], names)
        if not train:
            raise InvalidInput(
                "metadata_dir", "no image/annotation records in its JSON files (see docs/api.md)"
            )
        if "test_images" in specs:
            test = pair_files(
                specs["test_images"],
                specs["test_annotations"],
                names,
                images_arg="test_images",
                annotations_arg="test_annotations",
            )
        return train, test, len(names)

    async def _metadata_pairs(
        self, artifact_id: str, metadata_dir: str
    ) -> tuple[list[Pair], list[Pair], list[str]]:
        """Pairs from the JSON files below ``metadata_dir`` (the original's format)."""
        assert self.artifacts is not None
        folder = spec_dir(metadata_dir)
        try:
            below = await self.artifacts.list_tree(
                artifact_id, folder, max_files=self.config.max_files
            )
        except NotFound:
            below = []
        json_files = [n for n in below if n.lower().endswith(".json")]
        if not json_files:
            raise InvalidInput(
                "metadata_dir", f"no JSON files in {metadata_dir!r} of {artifact_id!r}"
            )
        local = await self.artifacts.download(artifact_id, json_files)
        documents = {}
        for name in json_files:
            if local[name].stat().st_size > 16 * 1024 * 1024:
                raise ResourceLimit(f"metadata_dir: {name} is larger than 16 MiB")
            documents[name] = load_metadata_document(local[name].read_bytes(), name)
        train, test = pairs_from_metadata(documents)
        folders = {
            posixpath.dirname(p) for pair in (*train, *test) for p in (pair.image, pair.annotation)
        }
        listed = await self.artifacts.list_specs(artifact_id, sorted(folders)) if folders else []
        pairs_from_metadata(documents, listed)  # every listed file must exist
        return train, test, listed

    @api_method
    async def start_training(
        self,
        artifact: str,
        train_images: str | None = None,
        train_annotations: str | None = None,
        metadata_dir: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        model: str = "cpsam",
        n_samples: int | float | None = None,
        n_epochs: int = 10,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0001,
        min_train_masks: int = 5,
        validation_interval: int | None = None,
        enable_clahe: bool = False,
        rescale: bool = False,
        label: str | None = None,
        context: Any = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Start fine-tuning on a dataset artifact. Returns the status with "session_id".

        train_images/train_annotations: two folders ending in "/" (same file names) or two
        patterns with one "*" whose matched parts must be equal ("images/*.tif",
        "annotations/*_mask.tif"). Or metadata_dir: a folder of JSON files listing the
        image/annotation pairs. test_images/test_annotations: the same, for validation.
        model: "cpsam", a checkpoint name, one of your sessions, or a model artifact
        exported by this service. n_samples: a count, or a fraction between 0 and 1.
        label: free text to find the session by (list_training_sessions(labels=...)).
        Extra settings (see get_training_capabilities()): batch_size, lr_schedule,
        warmup_epochs, seed, nimg_per_epoch, sampling, recipe ("contract", "cellpose",
        "from-scratch": named settings; values you give win, the contract's defaults do not).
        "warnings" lists reasons the run may not change the model.
        """
        caller = caller_from_context(context)
        caller.require_login("start_training")
        specs = self._check_data_args(
            train_images, train_annotations, metadata_dir, test_images, test_annotations
        )
        hidden = {"device", "checkpoint_interval_s"}
        allowed_extra = (set(TrainingSettings.model_fields) - hidden) | {"recipe"}
        unknown = set(extra) - allowed_extra
        if unknown:
            raise InvalidInput(sorted(unknown)[0], "unknown argument")
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise InvalidInput("label", "must be a string of at most 200 characters")
        label = label.strip() or None if isinstance(label, str) else None
        if isinstance(n_epochs, int) and n_epochs > self.config.max_epochs:
            raise ResourceLimit(f"n_epochs: at most {self.config.max_epochs} on this service")
        if model is None or model == "":
            model = "cpsam"
        settings = validate_settings(
            apply_recipe(
                dict(
                    model=model,
                    n_epochs=n_epochs,
                    n_samples=n_samples,
                    learning_rate=learning_rate,
                    weight_decay=weight_decay,
                    min_train_masks=min_train_masks,
                    validation_interval=validation_interval,
                    enable_clahe=enable_clahe,
                    rescale=rescale,
                    **extra,
                )
            ),
            # metadata_dir may list test records; that is known only once it is read.
            has_test_data=test_images is not None or "metadata_dir" in specs,
        )
        base = await self._resolve_model(settings.model, caller)
        settings = settings.model_copy(update={"model": base.source})
        kept = self.sessions.list(owner=caller.id)
        if len(kept) >= self.config.max_sessions_per_user:
            raise ResourceLimit(
                f"you keep {len(kept)} training sessions (limit "
                f"{self.config.max_sessions_per_user}); delete some with delete_training_session"
            )
        active = [s for s in kept if s.read_status().status_type not in TERMINAL_STATES]
        if len(active) >= self.config.max_active_sessions_per_user:
            raise ResourceLimit(
                f"you already have {len(active)} active training sessions "
                f"(limit {self.config.max_active_sessions_per_user}); stop one first"
            )
        record = await readable_artifact(self.artifacts, artifact, caller)
        artifact_id = record["id"]
        session = self.sessions.create(
            settings,
            DataSpec(train=[], dataset_artifact_id=artifact_id, source=specs),
            owner=caller.id,
            message="Preparing: listing the dataset",
            label=label,
        )
        session.update_status(status_type="preparing", model=model)
        task = asyncio.get_running_loop().create_task(
            self._prepare(session, artifact_id, specs, record)
        )
        self._prepare_tasks[session.id] = task
        task.add_done_callback(lambda _t: self._prepare_tasks.pop(session.id, None))
        return _with_warnings(_status_dict(session), settings, base.source)

    async def _prepare(
        self,
        session: Session,
        artifact_id: str,
        specs: dict[str, str],
        record: dict[str, Any] | None = None,
    ) -> None:
        """List, pair and download the data, then queue the session."""
        assert self.artifacts is not None
        try:
            train, test, n_listed = await self._resolve_pairs(artifact_id, specs)
            settings = session.settings
            train = select_samples(train, settings.n_samples, settings.seed)
            wanted = [p for pair in (*train, *test) for p in (pair.image, pair.annotation)]

            def progress(done: int, total: int) -> None:
                if done == total or done % 50 == 0:
                    session.update_status(
                        message=f"Preparing: downloaded {done}/{total} files "
                        f"({len(train)} training pairs, {len(test)} test pairs)"
                    )

            local = await self.artifacts.download(
                artifact_id, wanted, record=record, progress=progress
            )
            data = DataSpec(
                train=[(str(local[p.image]), str(local[p.annotation])) for p in train],
                test=[(str(local[p.image]), str(local[p.annotation])) for p in test],
                dataset_artifact_id=artifact_id,
                source={**specs, "n_available": n_listed, "max_pixels": self.config.max_pixels},
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
    async def preflight_training_dataset(
        self,
        artifact: str,
        train_images: str | None = None,
        train_annotations: str | None = None,
        metadata_dir: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        n_samples: int | float | None = None,
        check_masks: bool = False,
        context: Any = None,
    ) -> dict[str, Any]:
        """Check a dataset's pairing before training, without training.

        Returns ok, train_pair_count, test_pair_count, n_samples_resolved and message (the
        original's keys). With check_masks=True every pair is also downloaded and read as
        training would read it; "problems" then lists each file that is wrong.
        """
        caller = caller_from_context(context)
        caller.require_login("preflight_training_dataset")
        specs = self._check_data_args(
            train_images, train_annotations, metadata_dir, test_images, test_annotations
        )
        if n_samples is not None:
            resolve_n_samples(n_samples, 1)  # a clear error for 1.5, 0, "x"
        artifact_id = await self._readable_artifact(artifact, caller)
        try:
            train, test, _listed = await self._resolve_pairs(artifact_id, specs)
        except (InvalidInput, ResourceLimit) as exc:
            return {
                "ok": False,
                "train_pair_count": 0,
                "test_pair_count": 0,
                "message": str(exc),
            }
        resolved = resolve_n_samples(n_samples, len(train)) if n_samples is not None else None
        message = f"Resolved {len(train)} training pair(s)"
        if resolved is not None and resolved < len(train):
            message += f"; {resolved} will be used (n_samples={n_samples})"
        if test:
            message += f"; {len(test)} test pair(s)"
        out: dict[str, Any] = {
            "ok": True,
            "train_pair_count": len(train),
            "test_pair_count": len(test),
            "message": message + ".",
        }
        if resolved is not None:
            out["n_samples_resolved"] = min(resolved, len(train))
        if check_masks:
            problems = await self._check_pairs(artifact_id, [*train, *test])
            out["problems"] = problems
            if problems:
                out["ok"] = False
                out["message"] += f" {len(problems)} file(s) cannot be used: see problems."
        return out

    async def _check_pairs(self, artifact_id: str, pairs: list[Pair]) -> list[str]:
        """Read every pair as training would; one line per file that fails."""
        from cellpose_finetuning.io.images import read_mask

        assert self.artifacts is not None
        wanted = [p for pair in pairs for p in (pair.image, pair.annotation)]
        local = await self.artifacts.download(artifact_id, wanted)

        def check() -> list[str]:
            problems = []
            for pair in pairs:
                try:
                    img = read_image(local[pair.image], max_pixels=self.config.max_pixels)
                    read_mask(local[pair.annotation], expected_shape=tuple(img.shape[-2:]))
                except CellposeFinetuningError as exc:
                    problems.append(
                        str(exc)
                        .replace(str(local[pair.image]), pair.image)
                        .replace(str(local[pair.annotation]), pair.annotation)
                    )
            return problems

        return await asyncio.to_thread(check)

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
        """Continue one of your sessions from its last weights (and optimizer state).

        The session keeps its id (the original made a new one); the answer carries
        "restarted_from" and "last_continued_time" as the original's did.
        """
        session = self._session(session_id, caller_from_context(context))
        if not session.data.train:
            raise InvalidInput("session_id", "this session never got its data; start a new one")
        continue_session(session, n_epochs)
        session.update_status(last_continued_time=datetime.now(UTC).isoformat())
        self.queue.submit(session, resume=True)
        return {**_status_dict(session), "restarted_from": session.id}

    @api_method
    async def list_training_sessions(
        self,
        status_types: list[str] | None = None,
        dataset_artifact_ids: list[str] | None = None,
        labels: list[str] | None = None,
        limit: int = 50,
        context: Any = None,
    ) -> dict[str, dict[str, Any]]:
        """Your training sessions, newest first: {session_id: status}.

        status_types, dataset_artifact_ids, labels: keep only sessions matching one of the
        values. limit: at most this many (1-1000).
        """
        caller = caller_from_context(context)
        caller.require_login("list_training_sessions")
        filters: dict[str, set[str] | None] = {}
        for arg, values in (
            ("status_types", status_types),
            ("dataset_artifact_ids", dataset_artifact_ids),
            ("labels", labels),
        ):
            if values is None:
                filters[arg] = None
                continue
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
                raise InvalidInput(arg, "must be a list of strings")
            filters[arg] = set(values)
        unknown = (filters["status_types"] or set()) - _STATUS_TYPES
        if unknown:
            raise InvalidInput(
                "status_types", f"unknown {sorted(unknown)}; use {sorted(_STATUS_TYPES)}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidInput("limit", f"must be a whole number from 1 to 1000, got {limit!r}")
        out: dict[str, dict[str, Any]] = {}
        # Session ids start with their creation time: newest first is reverse order.
        for session in reversed(self.sessions.list(owner=caller.id)):
            st = session.read_status()
            if (
                filters["status_types"] is not None
                and st.status_type not in filters["status_types"]
            ):
                continue
            wanted_ids = filters["dataset_artifact_ids"]
            if wanted_ids is not None and st.dataset_artifact_id not in wanted_ids:
                continue
            if filters["labels"] is not None and st.label not in filters["labels"]:
                continue
            out[session.id] = _status_dict(session, st)
            if len(out) >= limit:
                break
        return out

    @api_method
    async def delete_training_session(self, session_id: str, context: Any = None) -> dict[str, Any]:
        """Delete one of your sessions that is not running. Returns {"deleted": session_id}."""
        caller = caller_from_context(context)
        session = self._session(session_id, caller)
        if session.is_terminal():
            # A finished run's worker may still be exiting: let it (the original's clients
            # delete right after they read "completed").
            for _ in range(150):
                if not self.queue.is_running(session.id):
                    break
                await asyncio.sleep(0.1)
        if self.queue.is_running(session.id) or session.id in self._prepare_tasks:
            raise InvalidInput("session_id", "the session is running; stop it first")
        self.queue.cancel(session.id)
        self.sessions.delete(session.id, owner=caller.id)
        return {"deleted": session.id, "session_id": session.id}

    @api_method
    async def debug_task_info(self, session_id: str, context: Any = None) -> dict[str, Any]:
        """Where one of your sessions is in this service: preparing task, queue, worker."""
        caller = caller_from_context(context)
        session = self._session(session_id, caller)
        mine = {s.id for s in self.sessions.list(owner=caller.id)}
        task = self._prepare_tasks.get(session.id)
        running = self.queue.is_running(session.id)
        info: dict[str, Any] = {
            "session_id": session.id,
            "status_type": session.read_status().status_type,
            "task_exists": task is not None or running,
            "executor_exists": running,
            "all_tasks": sorted(i for i in self._prepare_tasks if i in mine),
            "all_executors": sorted(i for i in mine if self.queue.is_running(i)),
        }
        if task is not None:
            info["task_done"] = task.done()
            info["task_cancelled"] = task.cancelled()
        return info

    # ------------------------------------------------------------------ export
    @api_method
    async def export_model(
        self,
        session_id: str,
        model_name: str | None = None,
        description: str | None = None,
        authors: list[dict[str, Any]] | None = None,
        uploader: dict[str, Any] | None = None,
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
        model_name: default "cellpose-<session id>". description is added to the model's
        description; authors: [{name, affiliation, ...}]; uploader: {name, email}.
        Exporting a session again before it trains further returns the first export.
        flow_threshold/cellprob_threshold are baked into the exported model.
        """
        import json
        import tempfile

        from cellpose_finetuning.errors import Conflict
        from cellpose_finetuning.export.bioimageio import build_package

        caller = caller_from_context(context)
        session = self._session(session_id, caller)
        status = session.read_status()
        if status.status_type not in ("completed", "stopped"):
            raise InvalidInput(
                "session_id",
                f"session {session.id!r} is {status.status_type}; "
                "only completed or stopped sessions can be exported",
            )
        if description is not None and not isinstance(description, str):
            raise InvalidInput("description", "must be a string")
        author_list = normalize_authors(authors)
        uploader_info = normalize_uploader(uploader)
        previous = session.path / "export.json"
        if (
            status.exported_artifact_id
            and status.model_modified is False
            and previous.is_file()
            and model_name in (None, status.exported_artifact_id.split("/")[-1])
        ):
            # The original returns the earlier export of an unchanged model.
            return json.loads(previous.read_text())
        if model_name is None or model_name == "":
            model_name = default_model_name(session.id)
        if not isinstance(model_name, str) or not MODEL_NAME.fullmatch(model_name):
            raise InvalidInput(
                "model_name", f"use 3-63 lowercase letters, digits and hyphens (got {model_name!r})"
            )
        record = await writable_collection(self.artifacts, collection, caller)
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
                authors=author_list or [caller.id],
                description=description,
                uploader=uploader_info,
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
        answer = {
            "artifact_id": art["id"],
            "model_name": model_name,
            "status": "exported",
            "artifact_url": url,
            "download_url": f"{url}/create-zip-file",
            "files": names,
        }
        atomic_write_json(previous, answer)
        session.update_status(exported_artifact_id=art["id"], model_modified=False)
        return answer

    @api_method
    async def list_models_by_dataset(
        self, dataset_id: str, collection: str = DEFAULT_COLLECTION, context: Any = None
    ) -> list[dict[str, Any]]:
        """Models in a collection trained on a dataset: id, name, created_at, url; newest first.

        Only models this service exported and the caller may read are listed.
        """
        caller = caller_from_context(context)
        dataset_id = parse_artifact_id(dataset_id, "dataset_id")
        record = await readable_artifact(
            self.artifacts, collection, caller, arg="collection", kind="collection"
        )
        if record.get("type") != "collection":
            raise InvalidInput("collection", f"{record['id']!r} is not a collection")
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
                item = dict(item)
                if not self._listable_model(item, record, caller):
                    continue
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

    def _listable_model(
        self, item: dict[str, Any], collection: dict[str, Any], caller: Caller
    ) -> bool:
        """A model this service exported (``created_by``) that the caller may read."""
        service_user = self.owners.service_user
        if service_user is not None and item.get("created_by") != service_user:
            return False  # anyone with "@": "r+" could have added it
        return can_read(caller, item, collection)

    # ------------------------------------------------------------------ annotation files
    @api_method
    async def read_annotation(
        self,
        file_name: str,
        data: bytes,
        image_shape: list[int] | None = None,
        context: Any = None,
    ) -> dict[str, Any]:
        """Read one annotation file as training reads it, before anything is uploaded.

        file_name: its name; the suffix picks the reader (label image, cellpose GUI _seg.npy,
        QuPath .geojson, ImageJ ROI set .zip). data: the file's bytes. image_shape: the paired
        image's [height, width] (needed for .geojson and .zip). Returns {"labels": uint16 or
        uint32 array, "n_objects": int}; errors name the file.
        """
        from cellpose_finetuning.io.annotations import read_annotation_bytes

        caller_from_context(context)
        if isinstance(data, bytes | bytearray) and len(data) > self.config.max_pixels * 8:
            raise ResourceLimit(f"{file_name}: file larger than {self.config.max_pixels * 8:,} B")
        labels = await asyncio.to_thread(
            read_annotation_bytes,
            file_name,
            data,
            image_shape,
            max_pixels=self.config.max_pixels,
        )
        return {"labels": labels, "n_objects": int(labels.max())}

    @api_method
    async def convert_masks(
        self,
        masks: Any,
        image_name: str,
        formats: list[str] | None = None,
        context: Any = None,
    ) -> dict[str, bytes]:
        """Masks as the files the tools open: {file name: bytes}.

        masks: (H, W) labels (e.g. infer's "output"). image_name: the segmented image's file
        name; names keep its whole stem. formats: any of "tif" (<stem>_masks.tif), "seg"
        (cellpose GUI <stem>_seg.npy), "png" (<stem>_cp_masks.png), "rois" (Fiji
        <stem>_rois.zip), "geojson" (QuPath <stem>.geojson); default all.
        """
        from cellpose_finetuning.io.annotations import OUTPUT_FORMATS, encode_outputs

        caller_from_context(context)
        if not isinstance(masks, np.ndarray):
            raise InvalidInput("masks", f"expected a numpy array, got {type(masks).__name__}")
        self._check_pixels(masks.shape, "masks")
        if not isinstance(image_name, str) or not image_name.strip():
            raise InvalidInput("image_name", "must be the image's file name")
        return await asyncio.to_thread(
            encode_outputs, masks, image_name, list(formats or OUTPUT_FORMATS)
        )

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
