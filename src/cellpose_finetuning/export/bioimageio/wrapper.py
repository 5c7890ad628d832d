"""Cellpose-SAM instance segmentation as one torch module (the ``model.py`` of an export).

This module is written into every wrapper-form BioImage.IO package we
export, as ``model.py``, with the text of :mod:`.network` (and in it of
:mod:`cellpose_finetuning.engine.sam_encoder`) in place of its import, and
named there as the architecture of the ``pytorch_state_dict`` weights. That
``model.py`` needs only ``cellpose`` (which brings ``torch`` and
``segment_anything``), not ``cellpose_finetuning``.

:class:`CellposeSAMSegmenter` is the standard form's network
(:class:`~.network.CellposeSAMFlows`, cellpose's ``Transformer`` built with
the encoder size given as keyword arguments), so the package's weights file
is a plain cellpose state dict: it loads here with ``strict=True`` and into
cellpose itself.

Its ``forward`` runs cellpose's complete ``CellposeModel.eval`` on each image
of the batch, so the output is a label image, not the network's raw flows:

- pre-processing (inside): each channel is scaled so its 1st/99th percentiles
  become 0/1 (cellpose's ``normalize99``); images with fewer than three
  channels are zero-padded to three and extra channels dropped; with
  ``diameter`` set the image is resized by ``30 / diameter``;
- the network runs on overlapping ``bsize`` x ``bsize`` tiles, so any image
  size is accepted;
- post-processing (inside): cellpose's flow dynamics (``niter`` steps) turn
  flows and cell probability into masks; masks whose flow error exceeds
  ``flow_threshold``, pixels with cell probability below
  ``cellprob_threshold`` and objects smaller than ``min_size`` pixels are
  dropped.

Input ``(B, C, H, W)`` raw intensities (any range, float32); output
``(B, 1, H, W)`` int32 labels, 0 = background.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from cellpose.vit_sam import Transformer

from cellpose_finetuning.export.bioimageio.network import CellposeSAMFlows  # inlined on export

__all__ = ["CellposeSAMSegmenter"]


class _FlowNetwork:
    """What cellpose's tiling code calls: the plain network pass of the segmenter.

    ``CellposeSAMSegmenter.forward`` is the whole segmentation, so cellpose
    must not call it per tile; this view calls ``Transformer.forward``.
    """

    def __init__(self, owner: CellposeSAMSegmenter) -> None:
        self._owner = owner

    @property
    def device(self) -> torch.device:
        return self._owner.device

    @property
    def dtype(self) -> torch.dtype:
        return self._owner.dtype

    def eval(self) -> _FlowNetwork:
        self._owner.eval()
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return Transformer.forward(self._owner, x)


class CellposeSAMSegmenter(CellposeSAMFlows):
    """Cellpose-SAM network plus cellpose's pre- and post-processing.

    Parameters
    ----------
    **network
        Encoder shape, token and tile size and outputs, as
        :class:`CellposeSAMFlows` (three input channels: cellpose pads and
        cuts the image's channels itself).
    diameter : float, optional
        Typical object diameter in pixels; the image is resized by
        ``30 / diameter``. None: no resizing.
    flow_threshold, cellprob_threshold, min_size, niter
        Cellpose mask-creation parameters (0.4, 0.0, 15, None = 200).
    tile_overlap, batch_size
        Tiling of the network pass (0.1, 8 tiles per pass).
    """

    def __init__(
        self,
        diameter: float | None = None,
        flow_threshold: float = 0.4,
        cellprob_threshold: float = 0.0,
        min_size: int = 15,
        niter: int | None = None,
        tile_overlap: float = 0.1,
        batch_size: int = 8,
        **network: Any,
    ) -> None:
        super().__init__(**network)
        self.eval_kwargs: dict[str, Any] = {
            "diameter": diameter,
            "flow_threshold": flow_threshold,
            "cellprob_threshold": cellprob_threshold,
            "min_size": min_size,
            "niter": niter,
            "tile_overlap": tile_overlap,
            "batch_size": batch_size,
        }

    def _cellpose_model(self) -> Any:
        """A ``CellposeModel`` around this network (its ``__init__`` always builds ViT-L)."""
        from cellpose.models import CellposeModel

        model = CellposeModel.__new__(CellposeModel)
        model.device = self.device
        model.gpu = self.device.type in ("cuda", "mps")
        model.net = _FlowNetwork(self)
        model.pretrained_model = "cellpose_sam_segmenter"
        return model

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Segment one ``(C, H, W)`` image; returns ``(H, W)`` int32 labels."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"expected one (C, H, W) image, got shape {image.shape}")
        height, width = image.shape[-2:]
        if not np.isfinite(image).all() or np.ptp(image) == 0:
            # Nothing to normalise: cellpose would divide by zero.
            return np.zeros((height, width), np.int32)
        masks, _flows, _styles = self._cellpose_model().eval(
            image, channel_axis=0, bsize=self.bsize, normalize=True, **self.eval_kwargs
        )
        masks = np.asarray(masks).reshape(height, width)
        return masks.astype(np.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Segment a batch: ``(B, C, H, W)`` raw images -> ``(B, 1, H, W)`` int32 labels."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        images = x.detach().to("cpu", torch.float32).numpy()
        with torch.no_grad():
            labels = np.stack([self.segment(img)[None] for img in images])
        return torch.from_numpy(labels).to(x.device)
