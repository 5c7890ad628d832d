"""The epoch loop: cellpose's ``train_seg`` step for step, stoppable within a batch.

:class:`EpochLoop` trains one epoch (cellpose's batching, augmentation, loss
and AdamW) and validates on fixed augmented tiles; :func:`score_network`
gives instance metrics as ``infer`` would segment; :func:`fixed_tile_loss`
scores a checkpoint on the validation tiles without training. The run
around it (status, checkpoints) is :func:`cellpose_finetuning.engine.training.run_training`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from cellpose_finetuning.engine.metrics import pixel_metrics_from_counts, score_masks
from cellpose_finetuning.engine.schedules import epoch_order
from cellpose_finetuning.engine.schemas import (
    InferenceSettings,
    InstanceMetrics,
    TrainingSettings,
    ValidationMetrics,
)
from cellpose_finetuning.engine.training_data import PreparedData, load_pairs, prepare_arrays

if TYPE_CHECKING:
    import torch

__all__ = ["EpochLoop", "StopRequested", "fixed_tile_loss", "score_network"]


class StopRequested(Exception):
    """Raised inside the loop when the session's STOP marker appears."""


class EpochLoop:
    """The epoch loop over prepared data; one instance per run."""

    def __init__(
        self,
        net: Any,
        prep: PreparedData,
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
    loaded = load_pairs([(str(a), str(b)) for a, b in pairs], "evaluation")
    settings = TrainingSettings(batch_size=batch_size, min_train_masks=0)
    prep = prepare_arrays(loaded, loaded, [str(b) for _, b in pairs], settings, dev)
    return EpochLoop(net, prep, settings, dev, lambda: False).validate()[0]


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
