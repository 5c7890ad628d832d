"""One resolver of the ``model`` argument: a name, checkpoint, session or path to weights.

Used by inference (``infer``, ``segment``, evaluation: :class:`ModelResolver`)
and by training (the base model of a new run:
:func:`cellpose_finetuning.engine.runs.resolve_base_model`), so a name means
the same weights everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellpose_finetuning.engine.models import PRETRAINED_MODELS, is_bioimageio_package
from cellpose_finetuning.engine.sessions import SessionStore
from cellpose_finetuning.errors import InvalidInput, NotFound, not_found_or_hidden

__all__ = ["ModelRef", "ModelResolver"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: what to load and how users call it."""

    name: str
    source: str  # "cpsam" or a checkpoint path
    kind: str  # "pretrained", "checkpoint", "session" or "package"

    def cache_key(self) -> tuple[str, float]:
        """Key that changes when the checkpoint file is rewritten."""
        if self.kind == "pretrained":
            return (self.source, 0.0)
        try:
            return (self.source, os.stat(self.source).st_mtime)
        except FileNotFoundError:
            return (self.source, -1.0)


class ModelResolver:
    """Turn the ``model`` argument into something loadable.

    Looked up in order: pretrained names (``cpsam``), checkpoint files in
    ``models_dir`` by file stem, session ids in ``sessions``, and (when
    ``allow_paths``, i.e. for the local CLI) checkpoint paths and session
    directories.
    """

    def __init__(
        self,
        *,
        models_dir: str | os.PathLike[str] | None = None,
        sessions: SessionStore | None = None,
        allow_paths: bool = False,
    ) -> None:
        self.models_dir = Path(models_dir) if models_dir else None
        self.sessions = sessions
        self.allow_paths = allow_paths

    def checkpoints(self) -> dict[str, Path]:
        """Checkpoint files offered by name (file stem -> path)."""
        if not self.models_dir or not self.models_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.models_dir.glob("*.pth")) if p.is_file()}

    def pretrained_names(self) -> list[str]:
        """Names of the pretrained models: ``cpsam`` plus the checkpoints by stem."""
        return [*PRETRAINED_MODELS, *self.checkpoints()]

    def resolve(
        self, model: str, *, owner: str | None = None, checkpoint: str = "best"
    ) -> ModelRef:
        """Resolve ``model``.

        Parameters
        ----------
        model : str
            Pretrained name, checkpoint stem, session id, or (CLI) a path.
        owner : str, optional
            Only this user's sessions are visible.
        checkpoint : {"best", "last"}
            Which checkpoint of a session to use.

        Raises
        ------
        NotFound
            If nothing matches (another user's session is also "not found").
        """
        if not isinstance(model, str) or not model:
            raise InvalidInput("model", "must be a non-empty string")
        if model in PRETRAINED_MODELS:
            return ModelRef(model, model, "pretrained")
        checkpoints = self.checkpoints()
        if model in checkpoints:
            return ModelRef(model, str(checkpoints[model]), "checkpoint")
        if self.allow_paths:
            path = Path(model).expanduser()
            if path.is_file():
                return ModelRef(model, str(path), "checkpoint")
            if is_bioimageio_package(path):
                return ModelRef(model, str(path), "package")
            if (path / "status.json").is_file():
                from cellpose_finetuning.engine.sessions import Session

                return self._session_ref(Session(path), model, checkpoint)
        elif "/" in model or "\\" in model or model.startswith("."):
            raise InvalidInput("model", f"{model!r}: model names may not contain paths")
        if self.sessions is not None and self.sessions.exists(model):
            try:
                session = self.sessions.get(model, owner=owner)
            except NotFound:
                session = None  # someone else's: answered exactly like a made-up name
            if session is not None:
                return self._session_ref(session, model, checkpoint)
        raise not_found_or_hidden(
            "model",
            model,
            f"Available: {self.pretrained_names()} or the id of one of your training sessions.",
        )

    @staticmethod
    def _session_ref(session: Any, name: str, checkpoint: str) -> ModelRef:
        weights = session.weights(checkpoint)
        if not weights.is_file():
            state = session.read_status().status_type
            raise InvalidInput(
                "model", f"session {session.id!r} has no weights yet (it is {state})"
            )
        return ModelRef(name, str(weights), "session")
