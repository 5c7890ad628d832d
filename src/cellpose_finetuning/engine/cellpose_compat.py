"""Every cellpose internal we rely on, in one place.

cellpose's training loop (``cellpose.train.train_seg``) is one function with no
callback: to watch, validate and stop a run epoch by epoch we call its pieces,
which are private (underscored), and we build and wrap networks of any size by
setting what ``CellposeModel.eval`` reads. A cellpose upgrade touches this
module (and the exported ``export/bioimageio/wrapper.py``, which must stay
free of our package and imports ``cellpose.vit_sam.Transformer`` itself).

What we use, and where cellpose changed it after 4.0.7 (read from the 4.0.8,
4.0.9, 4.1.0, 4.1.1, 4.2.0 and 4.2.1.1 wheels):

=============================================  ========================================
``train._process_train_test``                  same signature up to 4.2.1.1
``train._get_batch``                           unchanged up to 4.2.1.1
``train._loss_fn_seg``                         unchanged up to 4.2.1.1
``transforms.random_rotate_and_resize``        4.2: ``Y=``/``xy=`` become ``lbls=``/``bsize=``,
                                               runs on torch tensors (torchvision) and
                                               returns them on the device
``models.normalize_default``                   unchanged
``vit_sam.Transformer(backbone=...)``          4.1: ``dtype`` becomes a property;
                                               4.2: module ``vit_sam`` removed, the class is
                                               ``vit.CPSAM`` and has no ``backbone`` argument
``CellposeModel`` attributes ``eval`` reads    ``device``, ``gpu``, ``net``,
                                               ``pretrained_model`` (4.0.x)
=============================================  ========================================

So we support 4.0.x (tested: 4.0.7, the contract's version); 4.2 needs the
network building and the augmentation call ported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from cellpose.models import CellposeModel

__all__ = [
    "SUPPORTED",
    "augment",
    "get_batch",
    "loss_fn_seg",
    "make_eval_model",
    "normalize_defaults",
    "process_train_test",
    "transformer_class",
]

#: cellpose releases this module is written for (a PEP 440 specifier).
SUPPORTED = ">=4.0.7,<4.1"


def process_train_test(**kwargs: Any) -> tuple[Any, ...]:
    """cellpose's data preparation for training: flows, diameters, normalisation."""
    from cellpose import train

    return train._process_train_test(**kwargs)


def get_batch(inds: np.ndarray, data: list, labels: list) -> tuple[list, list]:
    """The images and flow labels at ``inds``, as ``train_seg`` takes them."""
    from cellpose import train

    return train._get_batch(inds, data=data, labels=labels, files=None)


def loss_fn_seg(lbl: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """cellpose's segmentation loss (flow MSE + cell-probability BCE)."""
    from cellpose import train

    return train._loss_fn_seg(lbl, y, device)


def augment(
    imgs: list, lbls: list, rescale: np.ndarray, scale_range: float, bsize: int
) -> tuple[np.ndarray, np.ndarray]:
    """``train_seg``'s augmentation: random rotation, flip, scale and a ``bsize`` crop."""
    from cellpose.transforms import random_rotate_and_resize

    imgi, lbl = random_rotate_and_resize(
        imgs, Y=lbls, rescale=rescale, scale_range=scale_range, xy=(bsize, bsize)
    )[:2]
    return imgi, lbl


def normalize_defaults() -> dict[str, Any]:
    """A fresh copy of cellpose's normalisation settings (it mutates its own in place)."""
    from cellpose import models

    return dict(models.normalize_default)


def transformer_class() -> type:
    """cellpose's network class (Cellpose-SAM), built with a named SAM backbone."""
    from cellpose.vit_sam import Transformer

    return Transformer


def make_eval_model(net: Any, device: torch.device, name: str) -> CellposeModel:
    """A ``CellposeModel`` around ``net`` without building ViT-L first.

    ``CellposeModel.__init__`` always builds the full-size network; ``eval``
    reads only these four attributes, so any architecture works.
    """
    from cellpose.models import CellposeModel

    model = CellposeModel.__new__(CellposeModel)
    model.device = device
    model.gpu = device.type in ("cuda", "mps")
    model.net = net.to(device)
    model.pretrained_model = name
    return model


def installed_version() -> str:
    """The cellpose version installed."""
    from importlib.metadata import version

    return version("cellpose")
