"""The training runner: cellpose 4.0.7 training with epochs you can watch and stop.

The loop is cellpose's ``train.train_seg`` step for step: its data
preparation (``_process_train_test``: flows, diameters, normalisation), its
batching (``_get_batch``), its augmentation (``random_rotate_and_resize``),
its loss (``_loss_fn_seg``) and AdamW. With ``lr_schedule="cellpose"`` and
the same seed it reproduces ``train_seg``'s losses exactly (tested). What we
add around it:

- a learning-rate warm-up proportional to the run (cellpose's is a fixed 10
  epochs from 0, so the contract's default 10-epoch run never reached its
  rate and its loss went *up* in the original tutorial);
- validation on the first, every ``validation_interval``-th and the last
  epoch: test loss on fixed augmented tiles (as cellpose does) plus pixel
  metrics of predicted foreground (cell probability > 0) against true
  foreground;
- best (by test loss) and last checkpoints, optimizer state, stop within a
  batch, continuing a finished or stopped run;
- instance metrics (AP at IoU 0.5/0.75/0.9) on the test set by full cellpose
  inference at the end.

The run happens in a separate process (:func:`start_worker`) that reports
through the session's ``status.json``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cellpose_finetuning.engine.metrics import ap_change
from cellpose_finetuning.engine.schedules import (
    default_warmup,
    epoch_order,
    lr_schedule,
    validation_epochs,
)
from cellpose_finetuning.engine.schemas import TrainingSettings, TrainingStatus
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.engine.training_data import PreparedData, prepare_session_data
from cellpose_finetuning.engine.training_loop import (
    EpochLoop,
    StopRequested,
    fixed_tile_loss,
    score_network,
)
from cellpose_finetuning.engine.workers import (
    TrainingWorker,
    ignore_terminal_interrupt,
    own_create_time,
    start_worker,
    worker_main,
)
from cellpose_finetuning.errors import InvalidInput

if TYPE_CHECKING:
    import torch

# The schedules, the epoch loop and the worker process live in their own
# modules; their names stay importable from here, where callers always found them.
__all__ = [
    "EpochLoop",
    "StopRequested",
    "TrainingWorker",
    "continue_session",
    "default_warmup",
    "epoch_order",
    "fixed_tile_loss",
    "ignore_terminal_interrupt",
    "lr_schedule",
    "run_training",
    "score_network",
    "settings_warnings",
    "start_worker",
    "validation_epochs",
    "worker_main",
    "write_curves",
]

log = logging.getLogger(__name__)


def settings_warnings(settings: TrainingSettings, **kwargs: Any) -> list[str]:
    """See :func:`cellpose_finetuning.engine.recipes.settings_warnings`."""
    from cellpose_finetuning.engine.recipes import settings_warnings as warn

    return warn(settings, **kwargs)


def _load_start_network(session: Session, settings: TrainingSettings, resume: bool) -> Any:
    """The network to train: the session's last weights when continuing, else the base."""
    import torch

    from cellpose_finetuning.engine.models import PRESETS, load_cellpose_model, load_network

    if resume and session.has_weights():
        net, arch = load_network(session.weights("last"), dtype=torch.float32)
        return net, arch
    if settings.model == "cpsam":
        cp, arch = load_cellpose_model("cpsam", device="cpu", dtype="float32")
        return cp.net, PRESETS["cpsam"]
    return load_network(settings.model, dtype=torch.float32)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def run_training(session: Session, *, resume: bool = False) -> TrainingStatus:
    """Run (or continue) a session's training in this process.

    Writes ``status.json`` as it goes. Raises on failure; :func:`worker_main`
    turns that into a ``failed`` status.

    Parameters
    ----------
    session : Session
        The session to run; its settings and data define the run.
    resume : bool
        Continue from the session's last checkpoint and history.

    Returns
    -------
    TrainingStatus
        The final status (``completed`` or ``stopped``).
    """
    import torch

    from cellpose_finetuning.engine.models import pick_device, save_network

    settings = session.settings
    status = session.read_status(reconcile=False)
    t_start = time.time()
    prior_elapsed = (status.elapsed_seconds or 0.0) if resume else 0.0
    if not resume:
        status.train_losses, status.test_losses, status.test_metrics = [], [], []
        status.instance_metrics, status.best_epoch = None, None
        status.base_instance_metrics = None
    status = session.write_status(
        status.model_copy(
            update={
                "status_type": "preparing",
                "message": "Loading images and computing flows",
                "start_time": status.start_time if resume and status.start_time else _now(),
                "worker_pid": os.getpid(),
                "worker_create_time": own_create_time(),
                "worker_host": socket.gethostname(),
            }
        )
    )
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)
    prep = prepare_session_data(session, settings, device)
    net, arch = _load_start_network(session, settings, resume)
    net.to(device)
    net.diam_labels.data = torch.tensor([float(prep.diam_train.mean())], device=device)
    starts_fresh = not (resume and session.has_weights())
    if prep.raw_test and starts_fresh and status.base_instance_metrics is None:
        status = session.write_status(
            status.model_copy(
                update={"message": "Scoring the starting model on the test set (baseline)"}
            )
        )
        status.base_instance_metrics = score_network(
            net, device, [m for _, m in prep.raw_test], [img for img, _ in prep.raw_test]
        )
    loop = EpochLoop(net, prep, settings, device, lambda: session.stop_requested)
    if resume and session.optimizer_file.is_file():
        loop.optimizer.load_state_dict(
            torch.load(session.optimizer_file, map_location=device, weights_only=True)
        )

    start_epoch = len(status.train_losses)
    total_epochs = status.total_epochs or settings.n_epochs
    schedule = lr_schedule(
        settings.n_epochs,
        settings.learning_rate,
        kind=settings.lr_schedule,
        warmup=settings.warmup_epochs,
    )
    val_epochs = (
        validation_epochs(total_epochs, settings.effective_validation_interval)
        if prep.test_data
        else set()
    )
    best_loss = min((x for x in status.test_losses if x is not None), default=math.inf)
    dropped_note = f" ({len(prep.dropped)} images with too few objects dropped)" * bool(
        prep.dropped
    )
    warnings = settings_warnings(settings, arch=arch, n_train=prep.n_train) if not resume else []
    for warning in warnings:
        log.warning("%s", warning)
    warning_note = "".join(f". Warning: {w}" for w in warnings)
    status = session.write_status(
        status.model_copy(
            update={
                "status_type": "running",
                "message": f"Training on {prep.n_train} images{dropped_note}{warning_note}",
                "n_train": prep.n_train,
                "n_test": prep.n_test,
                "total_epochs": total_epochs,
                "current_epoch": start_epoch,
                "elapsed_seconds": prior_elapsed,
                "model_modified": True,
            }
        )
    )
    last_save = time.time()
    last_batch_write = [0.0]

    def on_batch(batch: int, batches: int) -> None:
        # At most one status write a second, and always the epoch's last batch.
        now = time.time()
        if batch + 1 < batches and now - last_batch_write[0] < 1.0:
            return
        last_batch_write[0] = now
        status.current_batch, status.total_batches = batch, batches
        status.elapsed_seconds = prior_elapsed + now - t_start
        session.write_status(status)

    loop.on_batch = on_batch

    def save_last() -> None:
        save_network(net, arch, session.weights("last").with_name("last.pth"))
        tmp = session.optimizer_file.with_suffix(".tmp")
        torch.save(loop.optimizer.state_dict(), tmp)
        os.replace(tmp, session.optimizer_file)

    try:
        for epoch in range(start_epoch, total_epochs):
            lr = float(schedule[epoch]) if epoch < len(schedule) else settings.learning_rate
            train_loss = loop.train_epoch(epoch, lr)
            test_loss, metrics = None, None
            if epoch in val_epochs:
                test_loss, metrics = loop.validate()
                if test_loss < best_loss:
                    best_loss = test_loss
                    save_network(net, arch, session.path / "weights" / "best.pth")
                    status.best_epoch = epoch + 1
            status.train_losses.append(float(train_loss))
            status.test_losses.append(test_loss)
            status.test_metrics.append(metrics)
            done = epoch + 1
            msg = f"Epoch {done}/{total_epochs}: train loss {train_loss:.4f}"
            if test_loss is not None and metrics is not None:
                msg += f", test loss {test_loss:.4f}, F1 {metrics.f1:.3f}"
            if time.time() - last_save >= settings.checkpoint_interval_s:
                save_last()
                last_save = time.time()
            status = session.write_status(
                status.model_copy(
                    update={
                        "current_epoch": done,
                        "message": msg,
                        "elapsed_seconds": prior_elapsed + time.time() - t_start,
                    }
                )
            )
            log.info("%s (lr %.3g)", msg, lr)
            if session.yield_requested and done < total_epochs:
                # The fair scheduler wants this slot for another user's session:
                # keep everything and wait to be continued (it queues us again).
                save_last()
                session.clear_yield()
                status = session.write_status(
                    status.model_copy(
                        update={
                            "status_type": "waiting",
                            "message": f"Paused after epoch {done}/{total_epochs} to let "
                            "another user's session train; it continues automatically",
                            "worker_pid": None,
                        }
                    )
                )
                return status
    except StopRequested:
        save_last()
        session.clear_stop()
        done = len(status.train_losses)
        status = session.write_status(
            status.model_copy(
                update={
                    "status_type": "stopped",
                    "message": f"Stopped by request after {done} of {total_epochs} epochs; "
                    "weights kept. Continue the session to train further.",
                    "elapsed_seconds": prior_elapsed + time.time() - t_start,
                    "worker_pid": None,
                }
            )
        )
        write_curves(session, status)
        return status

    save_last()
    session.clear_yield()
    if prep.raw_test:
        status = session.write_status(
            status.model_copy(update={"message": "Computing instance metrics on the test set"})
        )
        status.instance_metrics = _instance_metrics(session, prep, device)
    change = ap_change(status.base_instance_metrics, status.instance_metrics)
    status = session.write_status(
        status.model_copy(
            update={
                "status_type": "completed",
                "message": f"Training completed: {total_epochs} epochs, final train loss "
                f"{status.train_losses[-1]:.4f}" + (f"; test {change}" if change else ""),
                "elapsed_seconds": prior_elapsed + time.time() - t_start,
                "worker_pid": None,
            }
        )
    )
    write_curves(session, status)
    return status


def _instance_metrics(session: Session, prep: PreparedData, device: torch.device) -> Any:
    """AP on the test set with the checkpoint inference will use (best, else last)."""
    from cellpose_finetuning.engine.models import load_network

    net, _ = load_network(session.weights("best"))
    net.to(device)
    return score_network(net, device, [m for _, m in prep.raw_test], [i for i, _ in prep.raw_test])


def write_curves(session: Session, status: TrainingStatus) -> None:
    """Draw the session's training curves; a failure is logged, never raised."""
    try:
        from cellpose_finetuning.engine.plots import plot_training_curves

        plot_training_curves(status, session.curves_file)
    except Exception:  # a picture must never fail a run
        log.exception("could not draw training curves")


def continue_session(session: Session, n_epochs: int | None = None) -> TrainingStatus:
    """Prepare a finished, stopped or failed session for more epochs.

    Parameters
    ----------
    session : Session
        The session to continue.
    n_epochs : int, optional
        Epochs to add; the session's original ``n_epochs`` by default. A
        failed or stopped run first finishes the epochs it had planned.

    Returns
    -------
    TrainingStatus
        The status, set to ``waiting`` with the new total.
    """
    status = session.read_status()
    if status.status_type in ("waiting", "preparing", "running"):
        raise InvalidInput("session_id", f"session {session.id!r} is {status.status_type}")
    if n_epochs is not None and n_epochs < 1:
        raise InvalidInput("n_epochs", f"must be at least 1, got {n_epochs}")
    done = len(status.train_losses)
    planned = status.total_epochs or session.settings.n_epochs
    if status.status_type == "completed" or n_epochs is not None:
        total = done + (n_epochs or session.settings.n_epochs)
    else:
        total = planned  # finish what was planned
    session.clear_stop()
    return session.update_status(
        status_type="waiting",
        message=f"Waiting to continue from epoch {done} to {total}",
        total_epochs=total,
        instance_metrics=None,
    )
