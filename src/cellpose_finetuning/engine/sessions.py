"""Training sessions on disk: one directory per session, readable by anyone.

A session directory holds::

    status.json          TrainingStatus, always replaced atomically
    settings.json        TrainingSettings (what the run does)
    data.json            the image/mask file pairs and where they came from
    meta.json            owner and free-form labels (who may see the session)
    weights/last.pth     last checkpoint (cellpose state dict + architecture)
    weights/best.pth     best checkpoint by validation test loss
    weights/optimizer.pt AdamW state, to continue a run exactly
    training_curves.png  loss / F1 / IoU per epoch
    log.txt              the worker's log
    STOP                 present while a stop is requested

Only the worker process writes ``status.json`` while it runs. A reader that
finds a session marked ``preparing``/``running`` whose worker process is
gone reports (and records) it as ``failed``, so a crash never leaves a
session that claims to be running, and the file is never half written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellpose_finetuning.engine.schemas import TERMINAL_STATES, TrainingSettings, TrainingStatus
from cellpose_finetuning.errors import InvalidInput, not_found_or_hidden

__all__ = ["DataSpec", "Session", "SessionStore", "atomic_write_json", "new_session_id"]

_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LIVE_STATES = frozenset({"preparing", "running"})


def new_session_id() -> str:
    """A fresh session id: sortable by creation time and unique."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``.

    Readers see the old or the new content, never a mix; a crash mid-write
    leaves the old file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _process_alive(pid: int | None, create_time: float | None) -> bool:
    """Whether ``pid`` is still the process that was recorded (pids get reused)."""
    if not pid:
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@dataclass
class DataSpec:
    """The file pairs a session trains and validates on, as local paths."""

    train: list[tuple[str, str]]
    test: list[tuple[str, str]] = field(default_factory=list)
    dataset_artifact_id: str | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form of the spec."""
        return {
            "train": [list(p) for p in self.train],
            "test": [list(p) for p in self.test],
            "dataset_artifact_id": self.dataset_artifact_id,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataSpec:
        """Inverse of :meth:`to_json`."""
        return cls(
            train=[(a, b) for a, b in data["train"]],
            test=[(a, b) for a, b in data.get("test", [])],
            dataset_artifact_id=data.get("dataset_artifact_id"),
            source=data.get("source", {}),
        )

    def files(self) -> list[str]:
        """Every file of the spec, images and annotations, in order."""
        return [p for pair in (*self.train, *self.test) for p in pair]

    def renamed(self, where: Mapping[str, Any]) -> DataSpec:
        """The same spec with each file replaced by ``str(where[file])`` (e.g. a download)."""
        return replace(
            self,
            train=[(str(where[a]), str(where[b])) for a, b in self.train],
            test=[(str(where[a]), str(where[b])) for a, b in self.test],
        )


class Session:
    """One training session directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.id = self.path.name

    # -- files ---------------------------------------------------------------
    @property
    def status_file(self) -> Path:
        """``status.json``."""
        return self.path / "status.json"

    @property
    def stop_file(self) -> Path:
        """Marker file asking the worker to stop."""
        return self.path / "STOP"

    @property
    def log_file(self) -> Path:
        """The worker's log."""
        return self.path / "log.txt"

    @property
    def curves_file(self) -> Path:
        """Training curve picture."""
        return self.path / "training_curves.png"

    def weights(self, which: str = "best") -> Path:
        """Path of a checkpoint: ``"best"`` (falls back to last) or ``"last"``."""
        if which not in ("best", "last"):
            raise InvalidInput("checkpoint", f"must be 'best' or 'last', got {which!r}")
        best, last = self.path / "weights" / "best.pth", self.path / "weights" / "last.pth"
        if which == "best" and best.is_file():
            return best
        return last

    @property
    def optimizer_file(self) -> Path:
        """AdamW state saved with the last checkpoint."""
        return self.path / "weights" / "optimizer.pt"

    def has_weights(self) -> bool:
        """Whether any checkpoint has been written."""
        return self.weights("last").is_file()

    # -- content -------------------------------------------------------------
    @property
    def settings(self) -> TrainingSettings:
        """The run's settings."""
        return TrainingSettings.model_validate_json((self.path / "settings.json").read_text())

    def write_settings(self, settings: TrainingSettings) -> None:
        """Replace the run's settings."""
        atomic_write_json(self.path / "settings.json", settings.model_dump(mode="json"))

    @property
    def data(self) -> DataSpec:
        """The file pairs of the run."""
        return DataSpec.from_json(json.loads((self.path / "data.json").read_text()))

    def write_data(self, data: DataSpec, *, update_status: bool = True) -> None:
        """Record the session's data (``data.json``) and its pair counts in the status."""
        atomic_write_json(self.path / "data.json", data.to_json())
        if update_status:
            self.update_status(n_train=len(data.train), n_test=len(data.test))

    @property
    def meta(self) -> dict[str, Any]:
        """Owner and labels."""
        path = self.path / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def owner(self) -> str | None:
        """The user the session belongs to (None for local, unowned sessions)."""
        return self.meta.get("owner")

    def read_status(self, *, reconcile: bool = True) -> TrainingStatus:
        """Read ``status.json``.

        With ``reconcile`` a session whose recorded worker process (on this
        host) is gone while it claims to be preparing or running is marked
        ``failed``.
        """
        status = TrainingStatus.model_validate_json(self.status_file.read_text())
        if (
            reconcile
            and status.status_type in _LIVE_STATES
            and status.worker_pid
            # On a cluster (Ray) the worker may run on another node, where its
            # pid means nothing here: only check workers of this host.
            and status.worker_host in (None, socket.gethostname())
            and not _process_alive(status.worker_pid, status.worker_create_time)
        ):
            epoch = status.current_epoch or 0
            status = self.update_status(
                status_type="failed",
                message=f"The training worker (pid {status.worker_pid}) ended unexpectedly "
                f"during epoch {epoch + 1}. Weights of the last saved checkpoint are kept; "
                "continue the session to train further.",
                worker_pid=None,
            )
        return status

    def write_status(self, status: TrainingStatus) -> TrainingStatus:
        """Persist ``status`` atomically (stamping ``updated_at``)."""
        status.updated_at = datetime.now(UTC).isoformat()
        atomic_write_json(self.status_file, status.model_dump(mode="json"))
        return status

    def update_status(self, **changes: Any) -> TrainingStatus:
        """Read, change some fields, write back."""
        status = TrainingStatus.model_validate_json(self.status_file.read_text())
        status = status.model_copy(update=changes)
        return self.write_status(TrainingStatus.model_validate(status.model_dump()))

    def request_stop(self) -> None:
        """Ask the worker to stop after the current batch."""
        self.stop_file.touch()

    def clear_stop(self) -> None:
        """Forget a stop request (before continuing)."""
        self.stop_file.unlink(missing_ok=True)

    @property
    def stop_requested(self) -> bool:
        """Whether a stop has been requested."""
        return self.stop_file.exists()

    @property
    def yield_file(self) -> Path:
        """Written by the fair scheduler: pause after this epoch, continue later."""
        return self.path / "yield"

    def request_yield(self) -> None:
        """Ask the worker to pause at the end of its epoch (it is queued again)."""
        self.yield_file.touch()

    def clear_yield(self) -> None:
        """Forget a pause request."""
        self.yield_file.unlink(missing_ok=True)

    @property
    def yield_requested(self) -> bool:
        """Whether the scheduler asked the worker to pause."""
        return self.yield_file.exists()

    def is_terminal(self) -> bool:
        """Whether the session is completed, failed or stopped."""
        return self.read_status().status_type in TERMINAL_STATES

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r})"


class SessionStore:
    """All sessions under one root directory.

    Parameters
    ----------
    root : path-like
        Directory that holds one sub-directory per session.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, session_id: str) -> Path:
        if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            raise InvalidInput("session_id", f"{session_id!r} is not a valid session id")
        return self.root / session_id

    def create(
        self,
        settings: TrainingSettings,
        data: DataSpec,
        *,
        owner: str | None = None,
        session_id: str | None = None,
        message: str = "Waiting to start",
        label: str | None = None,
    ) -> Session:
        """Create a session in state ``waiting``.

        Raises
        ------
        InvalidInput
            If ``session_id`` is malformed or already taken.
        """
        path = self._path(session_id or new_session_id())
        try:
            path.mkdir(parents=False)
        except FileExistsError:
            raise InvalidInput("session_id", f"a session {path.name!r} already exists") from None
        (path / "weights").mkdir()
        session = Session(path)
        atomic_write_json(path / "meta.json", {"owner": owner, "created_at": _now()})
        session.write_data(data, update_status=False)
        session.write_settings(settings)
        session.write_status(
            TrainingStatus(
                session_id=session.id,
                status_type="waiting",
                message=message,
                dataset_artifact_id=data.dataset_artifact_id,
                model=settings.model,
                n_train=len(data.train),
                n_test=len(data.test),
                total_epochs=settings.n_epochs,
                settings=settings.model_dump(mode="json"),
                label=label,
            )
        )
        return session

    def get(self, session_id: str, *, owner: str | None = None) -> Session:
        """Return a session.

        With ``owner`` given, a session of another owner is reported as not
        found, so its existence is not revealed.

        Raises
        ------
        NotFound
        """
        path = self._path(session_id)
        if not (path / "status.json").is_file():
            raise not_found_or_hidden("training session", session_id)
        session = Session(path)
        if owner is not None and session.owner != owner:
            raise not_found_or_hidden("training session", session_id)
        return session

    def exists(self, session_id: str) -> bool:
        """Whether a session with this id exists (whoever owns it)."""
        try:
            return (self._path(session_id) / "status.json").is_file()
        except InvalidInput:
            return False

    def __iter__(self) -> Iterator[Session]:
        for path in sorted(self.root.iterdir()):
            if (path / "status.json").is_file():
                yield Session(path)

    def list(self, *, owner: str | None = None) -> list[Session]:
        """Sessions, oldest first; only ``owner``'s when given."""
        return [s for s in self if owner is None or s.owner == owner]

    def delete(self, session_id: str, *, owner: str | None = None) -> None:
        """Delete a session that is not running.

        Raises
        ------
        InvalidInput
            If the session is still preparing or running.
        """
        session = self.get(session_id, owner=owner)
        state = session.read_status().status_type
        if state in _LIVE_STATES:
            raise InvalidInput("session_id", f"session {session_id!r} is {state}; stop it first")
        shutil.rmtree(session.path)


def _now() -> str:
    return datetime.now(UTC).isoformat()
