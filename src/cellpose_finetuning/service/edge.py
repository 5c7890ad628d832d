"""The service's edge: how a method's arguments arrive and how its errors leave.

Every method registered on Hypha is wrapped by :func:`api_method`: hypha-rpc JS
clients' one-dict calls are unpacked, internal typed errors become one clear
``ValueError``/``PermissionError``/``LookupError``/``RuntimeError`` whose text
names the argument or file, and the server's own paths are taken out.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from cellpose_finetuning.engine.recipes import model_architecture, settings_warnings
from cellpose_finetuning.engine.runs import validation_error_message
from cellpose_finetuning.engine.schemas import InferenceSettings, TrainingSettings, public_status
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import (
    CellposeFinetuningError,
    Forbidden,
    InvalidInput,
    NotFound,
    ResourceLimit,
)

__all__ = [
    "DATASET_DIR",
    "SERVICE_INFERENCE_FIELDS",
    "STATUS_TYPES",
    "WEIGHT_FILES",
    "api_method",
    "inference_schema",
    "is_artifact_ref",
    "public_error",
    "scrub_paths",
    "session_arg",
    "status_dict",
    "with_warnings",
]

log = logging.getLogger("cellpose_finetuning.service.api")
#: A session's own links to its dataset files (``<session>/dataset/<path>``).
DATASET_DIR = "dataset"
F = TypeVar("F", bound=Callable[..., Any])


def public_error(exc: Exception) -> Exception:
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

    A cached dataset file (``<data-dir>/cache/<id>/<version>/<path>``) or a
    session's link to one (``<data-dir>/sessions/<id>/dataset/<path>``) is
    named by its path in the dataset; anything else under the data directory
    by ``<data-dir>/...``.
    """
    root = re.escape(str(data_dir))
    text = re.sub(root + r"/cache/[^/\s'\"]+/[^/\s'\"]+/", "", text)
    text = re.sub(root + rf"/sessions/[^/\s'\"]+/{DATASET_DIR}/", "", text)
    return re.sub(root, "<data-dir>", text)


def api_method(func: F) -> F:
    """Wrap a service method: kwargs given as one dict, and clear errors."""

    @functools.wraps(func)
    async def wrapper(self: Any, *args: Any, context: Any = None, **kwargs: Any) -> Any:
        # hypha-rpc JS clients may pass all arguments as one dict.
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            kwargs, args = dict(args[0]), ()
        kwargs.pop("_rkwargs", None)
        try:
            return await func(self, *args, context=context, **kwargs)
        except TypeError as exc:
            if "argument" in str(exc):
                raise ValueError(f"{func.__name__}: {exc}") from None
            err = public_error(exc)
        except Exception as exc:
            err = public_error(exc)
        raise type(err)(scrub_paths(str(err), self.config.data_dir)) from None

    wrapper.__is_api__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def with_warnings(out: dict[str, Any], settings: TrainingSettings, model: str) -> dict[str, Any]:
    """Add "warnings" to start_training's answer when the settings cannot change the model."""
    warnings = settings_warnings(settings, arch=model_architecture(model))
    if warnings:
        out["warnings"] = warnings
    return out


def status_dict(session: Session, status: Any = None) -> dict[str, Any]:
    st = status or session.read_status()
    out = public_status(st, owner=session.owner)
    out["session_id"] = session.id
    if out.get("message"):
        out["message"] = scrub_paths(out["message"], session.path.parents[1])
    return out


def session_arg(session_id: Any) -> Any:
    """The original accepted ``<path>/<id>/status.json``: keep the id (other ids as given)."""
    if isinstance(session_id, str) and session_id.strip().endswith("/status.json"):
        value = session_id.strip().removesuffix("/status.json")
        return value.rsplit("/", 1)[-1]
    return session_id


def is_artifact_ref(model: str) -> bool:
    """Whether a ``model`` argument names a published model artifact (``ws/alias`` or URL)."""
    return model.startswith(("http://", "https://")) or model.count("/") == 1


#: Names of the weights file in a published model artifact, in order of preference
#: (ours is model_weights.pth; the others are what the original looked for).
WEIGHT_FILES = ("model_weights.pth", "model.pth", "weights.pth")
#: Status filter values accepted by list_training_sessions.
STATUS_TYPES = frozenset({"waiting", "preparing", "running", "completed", "failed", "stopped"})


#: The InferenceSettings fields the service's methods take (infer, evaluate, export_model).
SERVICE_INFERENCE_FIELDS = (
    "diameter",
    "flow_threshold",
    "cellprob_threshold",
    "niter",
    "block_size",
    "block_overlap",
)


def inference_schema() -> dict[str, Any]:
    """JSON schema of the inference settings the service takes: type, default, bounds, help."""
    props = InferenceSettings.model_json_schema()["properties"]
    return {
        name: {k: v for k, v in props[name].items() if k != "title"}
        for name in SERVICE_INFERENCE_FIELDS
    }
