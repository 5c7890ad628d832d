"""The service's session methods: status, stop, restart, list, delete, debug."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from cellpose_finetuning.engine.schemas import (
    TERMINAL_STATES,
)
from cellpose_finetuning.engine.training import continue_session
from cellpose_finetuning.errors import (
    InvalidInput,
)
from cellpose_finetuning.service.auth import (
    caller_from_context,
)
from cellpose_finetuning.service.base import ServiceBase
from cellpose_finetuning.service.edge import (
    STATUS_TYPES,
    api_method,
    status_dict,
)

__all__ = ["SessionMethods"]


class SessionMethods(ServiceBase):
    """What a caller may do with their own sessions."""

    @api_method
    async def get_training_status(self, session_id: str, context: Any = None) -> dict[str, Any]:
        """Status of one of your training sessions (status_type, message, losses, metrics...)."""
        session = self._session(session_id, caller_from_context(context))
        return status_dict(session)

    @api_method
    async def stop_training(self, session_id: str, context: Any = None) -> dict[str, Any]:
        """Stop one of your training sessions after the current batch, keeping its weights."""
        session = self._session(session_id, caller_from_context(context))
        status = session.read_status()
        if status.status_type in TERMINAL_STATES:
            return status_dict(session, status)
        task = self._prepare_tasks.get(session.id)
        if task is not None:
            task.cancel()
        if self.queue.cancel(session.id) or task is not None:
            session.update_status(status_type="stopped", message="Stopped before training started")
            return status_dict(session)
        session.request_stop()
        return status_dict(session)

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
        return {**status_dict(session), "restarted_from": session.id}

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
        unknown = (filters["status_types"] or set()) - STATUS_TYPES
        if unknown:
            raise InvalidInput(
                "status_types", f"unknown {sorted(unknown)}; use {sorted(STATUS_TYPES)}"
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
            out[session.id] = status_dict(session, st)
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
