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

import contextlib
import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from cellpose_finetuning.engine.metrics import ap_change, pixel_metrics_from_counts, score_masks
from cellpose_finetuning.engine.schemas import (
    InferenceSettings,
    InstanceMetrics,
    TrainingSettings,
    TrainingStatus,
    ValidationMetrics,
)
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import CellposeFinetuningError, InvalidInput

if TYPE_CHECKING:
    import torch

__all__ = [
    "TrainingWorker",
    "default_warmup",
    "epoch_order",
    "lr_schedule",
    "run_training",
    "score_network",
    "start_worker",
    "validation_epochs",
]

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised inside the loop when the session's STOP marker appears."""


def default_warmup(n_epochs: int) -> int:
    """Warm-up length for the proportional schedule: 10 % of the run, 1 to 10 epochs."""
    return int(min(10, max(1, round(n_epochs / 10))))


def lr_schedule(
    n_epochs: int, learning_rate: float, *, kind: str = "proportional", warmup: int | None = None
) -> np.ndarray:
    """Learning rate for each epoch.

    Parameters
    ----------
    n_epochs : int
        Length of the run.
    learning_rate : float
        Peak learning rate.
    kind : {"proportional", "cellpose"}
        ``cellpose`` is ``train_seg``'s schedule verbatim: ``linspace(0, lr, 10)``
        then constant. ``proportional`` warms up linearly over ``warmup``
        epochs (default :func:`default_warmup`) starting at ``lr / warmup``,
        so epoch 1 already trains.
    warmup : int, optional
        Warm-up epochs for ``proportional``; 0 disables warm-up.

    Returns
    -------
    numpy.ndarray
        ``n_epochs`` learning rates. Runs over 99 (300) epochs end with
        cellpose's halvings every 5 (10) epochs over the last 50 (100).
    """
    if kind == "cellpose":
        lr = np.linspace(0, learning_rate, 10)
        lr = np.append(lr, learning_rate * np.ones(max(0, n_epochs - 10)))
    elif kind == "proportional":
        w = default_warmup(n_epochs) if warmup is None else min(warmup, n_epochs)
        lr = np.full(n_epochs, learning_rate, dtype="float64")
        if w > 0:
            lr[:w] = learning_rate * np.arange(1, w + 1) / w
    else:
        raise InvalidInput("lr_schedule", f"unknown schedule {kind!r}")
    if n_epochs > 300:
        lr = lr[:-100]
        for _ in range(10):
            lr = np.append(lr, lr[-1] / 2 * np.ones(10))
    elif n_epochs > 99:
        lr = lr[:-50]
        for _ in range(10):
            lr = np.append(lr, lr[-1] / 2 * np.ones(5))
    return lr[:n_epochs]


def validation_epochs(n_epochs: int, interval: int) -> set[int]:
    """0-based epochs with validation: the first, every ``interval``-th, and the last."""
    epochs = {0, n_epochs - 1}
    epochs.update(e for e in range(n_epochs) if (e + 1) % interval == 0)
    return epochs


def epoch_order(
    nimg: int,
    nimg_per_epoch: int | None = None,
    sampling: str = "permutation",
    probs: np.ndarray | None = None,
) -> np.ndarray:
    """The image indices of one epoch, drawn from numpy's global random state.

    Parameters
    ----------
    nimg : int
        Number of training images.
    nimg_per_epoch : int, optional
        Samples in the epoch; ``nimg`` by default.
    sampling : {"permutation", "cellpose"}
        ``permutation``: every image once per pass, in a new random order each
        pass, passes repeated (and the last one cut) to fill ``nimg_per_epoch``.
        ``cellpose``: ``train_seg``'s rule, a permutation when
        ``nimg_per_epoch == nimg``, else ``nimg_per_epoch`` draws with
        replacement (``np.random.choice`` with ``probs``).
    probs : numpy.ndarray, optional
        Sampling probabilities for ``cellpose`` (uniform by default, computed
        as cellpose does so that the draws are the same).

    Returns
    -------
    numpy.ndarray
        ``nimg_per_epoch`` indices.
    """
    n = nimg if nimg_per_epoch is None else int(nimg_per_epoch)
    if sampling == "cellpose":
        if n != nimg:
            if probs is None:
                probs = 1.0 / nimg * np.ones(nimg, "float64")
                probs /= probs.sum()
            return np.random.choice(np.arange(0, nimg), size=(n,), p=probs)
        return np.random.permutation(np.arange(0, nimg))
    if sampling != "permutation":
        raise InvalidInput("sampling", f"unknown sampling {sampling!r}")
    passes = [np.random.permutation(np.arange(0, nimg)) for _ in range(-(-n // nimg))]
    return np.concatenate(passes)[:n]


@dataclass
class _Prepared:
    """Training data after cellpose's preparation."""

    train_data: list[np.ndarray]
    train_labels: list[np.ndarray]
    train_probs: np.ndarray
    diam_train: np.ndarray
    test_data: list[np.ndarray] | None
    test_labels: list[np.ndarray] | None
    raw_test: list[tuple[np.ndarray, np.ndarray]]
    n_train: int
    n_test: int
    dropped: list[str]


def _load_pairs(
    pairs: list[tuple[str, str]],
    role: str,
    max_pixels: int | None = None,
    *,
    clahe: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read image/mask pairs as (C,H,W) float images and (H,W) labels.

    ``max_pixels`` (the service's limit, from ``DataSpec.source``) refuses a
    file from its header before its pixels are read; ``clahe`` equalises each
    image (``enable_clahe``).
    """
    from cellpose_finetuning.engine.preprocess import apply_clahe
    from cellpose_finetuning.io.images import read_image, read_mask

    out = []
    for img_path, mask_path in pairs:
        img = read_image(img_path, max_pixels=max_pixels)
        if clahe and img.ndim == 3:
            img = apply_clahe(img)
        if img.ndim != 3:
            raise InvalidInput(
                img_path, f"{role} images must be 2D (got a stack of shape {img.shape})"
            )
        mask = read_mask(mask_path, expected_shape=tuple(img.shape[-2:]), max_pixels=max_pixels)
        out.append((img, mask))
    return out


def _prepare(session: Session, settings: TrainingSettings, device: torch.device) -> _Prepared:
    data = session.data
    return _prepare_arrays(
        _load_pairs(
            data.train, "training", data.source.get("max_pixels"), clahe=settings.enable_clahe
        ),
        _load_pairs(data.test, "test", data.source.get("max_pixels"), clahe=settings.enable_clahe),
        [m for _, m in data.train],
        settings,
        device,
    )


def _prepare_arrays(
    train: list[tuple[np.ndarray, np.ndarray]],
    test: list[tuple[np.ndarray, np.ndarray]],
    train_names: list[str],
    settings: TrainingSettings,
    device: torch.device,
) -> _Prepared:
    from cellpose_finetuning.engine import cellpose_compat as cpc

    counts = [int(len(np.unique(m)) - (1 if (m == 0).any() else 0)) for _, m in train]
    keep = [i for i, c in enumerate(counts) if c >= settings.min_train_masks]
    dropped = [train_names[i] for i in range(len(train)) if i not in keep]
    if not keep:
        raise InvalidInput(
            "train_annotations",
            f"no training mask has at least min_train_masks={settings.min_train_masks} objects "
            f"(object counts: {counts})",
        )
    train = [train[i] for i in keep]

    def as_cellpose(img: np.ndarray) -> np.ndarray:
        # cellpose's _reshape_norm turns (1,H,W) into (3,1,H,W); give it (H,W) instead.
        img = img.astype("float32", copy=False)
        return img[0] if img.shape[0] == 1 else img

    # A fresh dict: cellpose mutates models.normalize_default in place otherwise.
    normalize_params = {**cpc.normalize_defaults(), "normalize": True}
    out = cpc.process_train_test(
        train_data=[as_cellpose(img) for img, _ in train],
        train_labels=[m for _, m in train],
        test_data=[as_cellpose(img) for img, _ in test] or None,
        test_labels=[m for _, m in test] or None,
        load_files=False,
        min_train_masks=0,
        normalize_params=normalize_params,
        channel_axis=0,
        device=device,
    )
    (train_data, train_labels, _, _, train_probs, diam_train, test_data, test_labels, *_) = out
    return _Prepared(
        train_data=train_data,
        train_labels=train_labels,
        train_probs=train_probs,
        diam_train=diam_train,
        test_data=test_data,
        test_labels=test_labels,
        raw_test=test,
        n_train=len(train_data),
        n_test=len(test),
        dropped=dropped,
    )


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


class _Loop:
    """The epoch loop over prepared data; one instance per run."""

    def __init__(
        self,
        net: Any,
        prep: _Prepared,
        settings: TrainingSettings,
        device: torch.device,
        should_stop: Callable[[], bool],
    ) -> None:
        import torch

        self.net, self.prep, self.settings, self.device = net, prep, settings, device
        self.should_stop = should_stop
        #: Called with (batch index, batches per epoch) after each optimisation step.
        self.on_batch: Callable[[int, int], None] | None = None
        self.bsize = int(net.encoder.pos_embed.shape[1] * net.ps)
        self.optimizer = torch.optim.AdamW(
            net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )

    def _step_batch(self, inds: np.ndarray, data: list, labels: list) -> tuple[Any, Any, int]:
        import torch

        from cellpose_finetuning.engine import cellpose_compat as cpc

        imgs, lbls = cpc.get_batch(inds, data=data, labels=labels)
        if self.settings.rescale and data is self.prep.train_data:
            # train_seg's rescale: object diameter / the network's diameter.
            rsc = self.prep.diam_train[inds] / float(self.net.diam_mean.item())
        else:
            rsc = np.ones(len(inds), "float32")
        imgi, lbl = cpc.augment(imgs, lbls, rescale=rsc, scale_range=0.5, bsize=self.bsize)
        x = torch.from_numpy(imgi).to(self.device)
        lbl_t = torch.from_numpy(lbl).to(self.device)
        if x.dtype != self.net.dtype:
            x, lbl_t = x.to(self.net.dtype), lbl_t.to(self.net.dtype)
        y = self.net(x)[0]
        return y, lbl_t, len(imgi)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices of the training images an epoch uses, in order (see :func:`epoch_order`)."""
        np.random.seed(self.settings.seed + epoch)  # as train_seg: np.random.seed(iepoch)
        return epoch_order(
            len(self.prep.train_data),
            self.settings.nimg_per_epoch,
            self.settings.sampling,
            self.prep.train_probs,
        )

    def train_epoch(self, epoch: int, lr: float) -> float:
        """One epoch (``nimg_per_epoch`` samples); returns the mean loss."""
        from cellpose_finetuning.engine.cellpose_compat import loss_fn_seg

        rperm = self.epoch_order(epoch)
        nimg = len(rperm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.net.train()
        total = 0.0
        bs = self.settings.batch_size
        for k in range(0, nimg, bs):
            if self.should_stop():
                raise StopRequested
            y, lbl, n = self._step_batch(
                rperm[k : k + bs], self.prep.train_data, self.prep.train_labels
            )
            loss = loss_fn_seg(lbl, y, self.device)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * n
            if self.on_batch is not None:
                self.on_batch(k // bs, -(-nimg // bs))
        return total / nimg

    def validate(self) -> tuple[float, ValidationMetrics]:
        """Test loss and pixel metrics on fixed augmented tiles of the test set."""
        import torch

        from cellpose_finetuning.engine.cellpose_compat import loss_fn_seg

        assert self.prep.test_data is not None
        state = np.random.get_state()
        np.random.seed(42)  # the same tiles every validation, as train_seg does
        nimg = len(self.prep.test_data)
        rperm = np.random.permutation(np.arange(0, nimg))
        total, counts = 0.0, np.zeros(4, dtype="int64")  # tp, fp, fn, tn
        self.net.eval()
        with torch.no_grad():
            for k in range(0, nimg, self.settings.batch_size):
                y, lbl, n = self._step_batch(
                    rperm[k : k + self.settings.batch_size],
                    self.prep.test_data,
                    self.prep.test_labels,
                )
                total += loss_fn_seg(lbl, y, self.device).item() * n
                pred = (y[:, -1] > 0).cpu().numpy()
                true = (lbl[:, -3] > 0.5).cpu().numpy()
                counts += [
                    np.sum(pred & true),
                    np.sum(pred & ~true),
                    np.sum(~pred & true),
                    np.sum(~pred & ~true),
                ]
        np.random.set_state(state)
        return total / nimg, pixel_metrics_from_counts(*counts.tolist())


def _now() -> str:
    return datetime.now(UTC).isoformat()


def fixed_tile_loss(
    checkpoint: str | os.PathLike[str],
    pairs: list[tuple[str, str]],
    *,
    device: str | None = None,
    batch_size: int = 8,
) -> float:
    """Loss of a checkpoint on fixed augmented tiles of ``pairs``, without training.

    The tiles are the ones validation uses (seed 42), so two checkpoints are
    compared on exactly the same inputs: this is how we show that a run
    lowered the loss on its own training images.
    """
    from cellpose_finetuning.engine.models import load_network, pick_device

    dev = pick_device(device)
    net, _ = load_network(checkpoint)
    net.to(dev)
    loaded = _load_pairs([(str(a), str(b)) for a, b in pairs], "evaluation")
    settings = TrainingSettings(batch_size=batch_size, min_train_masks=0)
    prep = _prepare_arrays(loaded, loaded, [str(b) for _, b in pairs], settings, dev)
    return _Loop(net, prep, settings, dev, lambda: False).validate()[0]


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
                "worker_create_time": _own_create_time(),
                "worker_host": socket.gethostname(),
            }
        )
    )
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)
    prep = _prepare(session, settings, device)
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
    loop = _Loop(net, prep, settings, device, lambda: session.stop_requested)
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
        _write_curves(session, status)
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
    _write_curves(session, status)
    return status


def score_network(
    net: Any,
    device: torch.device,
    true_masks: list[np.ndarray],
    images: list[np.ndarray],
    settings: InferenceSettings | None = None,
) -> InstanceMetrics:
    """Instance metrics of a network on labelled images, as ``infer`` would segment them.

    The network is put in eval mode, and numpy's and torch's random states
    are restored afterwards, so scoring before epoch 1 changes nothing in
    the run that follows.
    """
    import torch

    from cellpose_finetuning.engine.inference import segment
    from cellpose_finetuning.engine.models import wrap_network

    np_state, torch_state = np.random.get_state(), torch.random.get_rng_state()
    was_training = net.training
    try:
        net.eval()
        model = wrap_network(net, device, "scoring")
        preds = [segment(model, img, settings) for img in images]
    finally:
        net.train(was_training)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
    return score_masks(true_masks, preds)[0]


def _instance_metrics(session: Session, prep: _Prepared, device: torch.device) -> Any:
    """AP on the test set with the checkpoint inference will use (best, else last)."""
    from cellpose_finetuning.engine.models import load_network

    net, _ = load_network(session.weights("best"))
    net.to(device)
    return score_network(net, device, [m for _, m in prep.raw_test], [i for i, _ in prep.raw_test])


def _write_curves(session: Session, status: TrainingStatus) -> None:
    try:
        from cellpose_finetuning.engine.plots import plot_training_curves

        plot_training_curves(status, session.curves_file)
    except Exception:  # a picture must never fail a run
        log.exception("could not draw training curves")


def _own_create_time() -> float | None:
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
            _write_curves(session, status)
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
