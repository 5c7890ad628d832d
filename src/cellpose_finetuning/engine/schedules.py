"""Planning a training run: learning-rate schedules, validation epochs, epoch sampling.

Pure functions of the settings (numpy only), used by the epoch loop
(:mod:`cellpose_finetuning.engine.training_loop`) and by the recipes'
checks (:mod:`cellpose_finetuning.engine.recipes`).
"""

from __future__ import annotations

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = ["default_warmup", "epoch_order", "lr_schedule", "validation_epochs"]


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
