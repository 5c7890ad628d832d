"""Training in its own process: the worker's entry points and its handle.

:func:`start_worker` spawns a process that runs
:func:`cellpose_finetuning.engine.training.run_training` and records any
failure in the session's ``status.json``; :class:`TrainingWorker` waits for
or kills it. Ray actors call :func:`worker_main` directly.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import traceback

from cellpose_finetuning.engine.schemas import TrainingStatus
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import CellposeFinetuningError

__all__ = [
    "TrainingWorker",
    "ignore_terminal_interrupt",
    "own_create_time",
    "start_worker",
    "worker_main",
]

log = logging.getLogger(__name__)


def own_create_time() -> float | None:
    """This process's creation time (psutil), or None where it cannot be read."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return None


def _setup_worker_logging(session: Session) -> None:
    handler = logging.FileHandler(session.log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def worker_main(session_dir: str, resume: bool = False, num_threads: int | None = None) -> None:
    """Entry point of the worker process: run, and record any failure in the status."""
    from cellpose_finetuning.engine.training import run_training, write_curves

    session = Session(session_dir)
    _setup_worker_logging(session)
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    try:
        run_training(session, resume=resume)
    except BaseException as exc:
        if isinstance(exc, CellposeFinetuningError):
            message = f"Training failed: {exc}"
        else:
            message = f"Training failed: {type(exc).__name__}: {exc}"
        log.error("%s\n%s", message, traceback.format_exc())
        try:
            status = session.read_status(reconcile=False)
            session.write_status(
                status.model_copy(
                    update={"status_type": "failed", "message": message, "worker_pid": None}
                )
            )
            write_curves(session, status)
        finally:
            if not isinstance(exc, Exception):
                raise


def ignore_terminal_interrupt() -> None:
    """Make this (worker) process ignore SIGINT.

    Ctrl-C in a terminal reaches the whole process group, training workers
    too. Whoever started a worker asks it to stop through the session's STOP
    marker, so that it saves its weights and reads ``stopped``; a
    KeyboardInterrupt would end the run as ``failed`` instead. Call it only
    in a process that exists for one run.
    """
    with contextlib.suppress(ValueError):  # not the main thread: nothing to do
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_process_main(session_dir: str, resume: bool, num_threads: int | None) -> None:
    """Entry point of a process started by :func:`start_worker`."""
    ignore_terminal_interrupt()
    worker_main(session_dir, resume, num_threads)


class TrainingWorker:
    """A training run in its own process.

    Use :func:`start_worker` to create one.
    """

    def __init__(self, session: Session, process: mp.process.BaseProcess) -> None:
        self.session = session
        self.process = process

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self.process.pid

    def is_alive(self) -> bool:
        """Whether the worker process still runs."""
        return self.process.is_alive()

    def wait(self, timeout: float | None = None) -> TrainingStatus:
        """Wait for the worker to end and return the final status.

        A worker that died without writing a final status (killed, crashed)
        leaves the session ``failed``.
        """
        self.process.join(timeout)
        return self.session.read_status()

    def kill(self) -> None:
        """Kill the worker at once (as a crash would)."""
        self.process.kill()
        self.process.join()


def start_worker(
    session: Session, *, resume: bool = False, num_threads: int | None = None
) -> TrainingWorker:
    """Start the session's training in a new process.

    Parameters
    ----------
    session : Session
        A session in state ``waiting`` (new) or a terminal state (``resume``).
    resume : bool
        Continue from the last checkpoint.
    num_threads : int, optional
        Torch CPU threads for the worker.

    Returns
    -------
    TrainingWorker
    """
    ctx = mp.get_context("spawn")
    process = ctx.Process(
        target=_worker_process_main,
        args=(str(session.path), resume, num_threads),
        name=f"cellpose-training-{session.id}",
        daemon=False,
    )
    process.start()
    import psutil

    try:
        create_time = psutil.Process(process.pid).create_time()
    except psutil.Error:
        create_time = None
    session.update_status(
        status_type="preparing",
        message="Starting the training worker",
        worker_pid=process.pid,
        worker_create_time=create_time,
    )
    return TrainingWorker(session, process)
