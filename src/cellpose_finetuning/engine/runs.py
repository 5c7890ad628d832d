"""Setting up a training run: check the settings and the data, create the session.

Shared by the CLI (local folders) and the service (artifact datasets, after
download): both hand over local image/mask file pairs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cellpose_finetuning.data.pairing import select_samples
from cellpose_finetuning.engine.models import PRETRAINED_MODELS
from cellpose_finetuning.engine.resolver import ModelResolver
from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.engine.sessions import DataSpec, Session, SessionStore
from cellpose_finetuning.errors import InvalidInput, NotFound

__all__ = [
    "create_local_session",
    "resolve_base_model",
    "training_data",
    "validate_settings",
    "validation_error_message",
]

PathPair = tuple[str | os.PathLike[str], str | os.PathLike[str]]


def validation_error_message(exc: ValidationError) -> tuple[str, str]:
    """The first problem of a pydantic error as (argument, reason)."""
    err = exc.errors()[0]
    arg = ".".join(str(x) for x in err.get("loc", ())) or "arguments"
    reason = err.get("msg", str(exc))
    if "input" in err and err.get("type") != "missing":
        reason += f" (got {err['input']!r})"
    return arg, reason


def validate_settings(values: dict[str, Any], *, has_test_data: bool) -> TrainingSettings:
    """Build :class:`TrainingSettings` from loose values, with clear errors.

    Raises
    ------
    InvalidInput
        Naming the first offending argument.
    """
    try:
        settings = TrainingSettings.model_validate(
            {k: v for k, v in values.items() if v is not None}
        )
    except ValidationError as exc:
        raise InvalidInput(*validation_error_message(exc)) from None
    if settings.validation_interval is not None and not has_test_data:
        raise InvalidInput(
            "validation_interval", "needs test data (test_images and test_annotations)"
        )
    return settings


def resolve_base_model(model: str) -> str:
    """The base model as the worker will load it: ``cpsam`` or an absolute file path.

    Resolved by the same :class:`~cellpose_finetuning.engine.resolver.ModelResolver`
    as inference (paths allowed): a session directory stands for its best
    checkpoint. BioImage.IO packages cannot be trained from.
    """
    neither = InvalidInput(
        "model", f"{model!r} is neither {list(PRETRAINED_MODELS)} nor a checkpoint file"
    )
    try:
        ref = ModelResolver(allow_paths=True).resolve(model)
    except NotFound:
        raise neither from None
    if ref.kind == "pretrained":
        return ref.source
    if ref.kind == "package":
        raise neither
    return str(Path(ref.source).resolve())


def _as_str_pairs(pairs: Sequence[Any]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        if hasattr(pair, "image"):
            out.append((str(pair.image), str(pair.annotation)))
        else:
            img, mask = pair
            out.append((str(Path(img).resolve()), str(Path(mask).resolve())))
    return out


def create_local_session(
    *,
    out: str | os.PathLike[str],
    train_pairs: Sequence[Any],
    test_pairs: Sequence[Any] = (),
    settings: dict[str, Any],
    source: dict[str, Any] | None = None,
    owner: str | None = None,
    dataset_artifact_id: str | None = None,
) -> Session:
    """Validate everything and create a session directory ``out`` in state ``waiting``.

    Parameters
    ----------
    out : path-like
        The session directory to create (its name is the session id).
    train_pairs, test_pairs : sequence
        (image, mask) local file pairs.
    settings : dict
        Loose training settings (see :class:`TrainingSettings`).
    source : dict, optional
        Where the data came from (recorded for people and exports).
    owner : str, optional
        The session's owner.
    dataset_artifact_id : str, optional
        The dataset the pairs were downloaded from.

    Returns
    -------
    Session
    """
    if not train_pairs:
        raise InvalidInput("train_images", "no training image/mask pairs")
    ts = validate_settings(settings, has_test_data=bool(test_pairs))
    ts = ts.model_copy(update={"model": resolve_base_model(ts.model)})
    data = training_data(
        train_pairs, test_pairs, ts, source=source, dataset_artifact_id=dataset_artifact_id
    )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidInput(
            "--out", f"{str(out)!r} already exists; use 'continue' or choose a new directory"
        )
    if out.exists():
        out.rmdir()
    store = SessionStore(out.parent if str(out.parent) else ".")
    return store.create(ts, data, owner=owner, session_id=out.name)


def training_data(
    train_pairs: Sequence[Any],
    test_pairs: Sequence[Any],
    settings: TrainingSettings,
    *,
    source: dict[str, Any] | None = None,
    dataset_artifact_id: str | None = None,
) -> DataSpec:
    """The data of a run: the seeded ``n_samples`` subset of the training pairs, and the test pairs.

    The CLI passes local file pairs; the service passes the dataset's
    :class:`~cellpose_finetuning.data.pairing.Pair` names and renames the spec to
    the downloaded files (:meth:`DataSpec.renamed`) before training.
    """
    chosen = select_samples(list(train_pairs), settings.n_samples, settings.seed)
    return DataSpec(
        train=_as_str_pairs(chosen),
        test=_as_str_pairs(test_pairs),
        dataset_artifact_id=dataset_artifact_id,
        source={**(source or {}), "n_available": len(train_pairs), "seed": settings.seed},
    )
