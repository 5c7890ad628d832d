"""What every group of service methods shares: state, sessions, model resolution.

:class:`~cellpose_finetuning.service.api.CellposeService` is assembled from
method groups (inference, training, sessions, publishing), each a subclass of
:class:`ServiceBase`, which declares the state they use and resolves sessions
and models for a caller.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from cellpose_finetuning.data.artifacts import ArtifactFiles
from cellpose_finetuning.engine.inference import ModelRef, ModelResolver
from cellpose_finetuning.engine.sessions import Session, SessionStore
from cellpose_finetuning.errors import Forbidden, InvalidInput
from cellpose_finetuning.scheduler import FairGate, InferenceExecutor, TrainingExecutor
from cellpose_finetuning.service.auth import Caller, WorkspaceOwners, readable_artifact
from cellpose_finetuning.service.config import ServiceConfig
from cellpose_finetuning.service.edge import WEIGHT_FILES, is_artifact_ref, session_arg

__all__ = ["ServiceBase"]


class ServiceBase:
    """State shared by the method groups, and the lookups they all need."""

    config: ServiceConfig
    sessions: SessionStore
    resolver: ModelResolver
    inference: InferenceExecutor
    queue: TrainingExecutor
    infer_gate: FairGate
    artifacts: ArtifactFiles | None
    owners: WorkspaceOwners
    server_url: str
    _prepare_tasks: dict[str, asyncio.Task[None]]

    # ------------------------------------------------------------------ helpers
    def _session(self, session_id: Any, caller: Caller) -> Session:
        session_id = session_arg(session_id)
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
        weights = next((f for f in WEIGHT_FILES if f in files), None) or next(
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
        if isinstance(model, str) and is_artifact_ref(model.strip()) and self.artifacts:
            if caller.is_anonymous:
                raise Forbidden("anonymous callers may only run model 'cpsam' on input_arrays")
            return await self._published_model(model.strip(), caller)
        return self.resolver.resolve(model, owner=caller.id)

    # ------------------------------------------------------------------ models
