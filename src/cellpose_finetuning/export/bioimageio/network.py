"""The Cellpose-SAM network alone (the ``model.py`` of a standard-form export).

This module is written into every standard-form BioImage.IO package we
export, as ``model.py``, with the text of
:mod:`cellpose_finetuning.engine.sam_encoder` in place of its import (so
the encoder builder has one source), and named there as the architecture of
the ``pytorch_state_dict`` weights. That ``model.py`` needs only ``cellpose``
(which brings ``torch`` and ``segment_anything``), not ``cellpose_finetuning``.

:class:`CellposeSAMFlows` *is* cellpose's ``Transformer`` (the network of
Cellpose-SAM) built with the encoder size given as keyword arguments, so the
weights file is a plain cellpose state dict that loads here with
``strict=True`` and into cellpose itself. Unlike the labels-out wrapper
(:mod:`.wrapper`) it runs only the network: the package describes
cellpose's normalisation as ``scale_range`` preprocessing and cellpose's
flow dynamics as ``cellpose_flow_dynamics`` postprocessing, and consumers
tile images themselves. Its ``forward`` is traceable, so the same module is
what the ``torchscript`` and ``onnx`` weights were made from.

Input ``(B, C, 256, 256)`` normalised float32 tiles (C = the channels the
model was trained with, zero-padded to cellpose's three inside); output
``(B, 3, 256, 256)``: Y flow, X flow, cell probability (logit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from cellpose.vit_sam import Transformer

from cellpose_finetuning.engine.sam_encoder import register_encoder  # inlined on export

__all__ = ["CellposeSAMFlows"]


class CellposeSAMFlows(Transformer):
    """Cellpose-SAM's network, returning only its flows and cell probability.

    Parameters
    ----------
    embed_dim, depth, num_heads, global_attn_indexes
        Shape of the SAM ViT encoder (ViT-L for Cellpose-SAM: 1024, 24, 16,
        (5, 11, 17, 23)).
    ps, bsize, nout
        Token size, tile size and number of network outputs (8, 256, 3).
    in_channels : int
        Channels of the input tensor (1-3); cellpose's network takes three,
        so missing ones are filled with zeros, as cellpose does.
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        global_attn_indexes: Sequence[int] = (5, 11, 17, 23),
        ps: int = 8,
        bsize: int = 256,
        nout: int = 3,
        in_channels: int = 3,
    ) -> None:
        if not 1 <= in_channels <= 3:
            raise ValueError(f"in_channels must be 1, 2 or 3, got {in_channels}")
        # Transformer looks its encoder up in SAM's registry by name.
        key = register_encoder(
            f"cellpose_sam_flows:{embed_dim}:{depth}:{num_heads}:{tuple(global_attn_indexes)}",
            embed_dim,
            depth,
            num_heads,
            global_attn_indexes,
        )
        super().__init__(backbone=key, ps=ps, nout=nout, bsize=bsize, dtype=torch.float32)
        self.bsize = bsize
        self.in_channels = in_channels
        # An inference-only network: no stochastic depth, and built in eval mode.
        # bioimageio.core's torchscript converter traces the module as constructed,
        # without .eval(); cellpose's training-mode forward drops encoder blocks at
        # random (rdrop), which the trace froze into the graph (torch.rand), so the
        # traced ViT-L's flows differed from PyTorch's by ~1 (docs/benchmarks.md).
        self.rdrop = 0.0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``(B, C, bsize, bsize)`` normalised tiles -> ``(B, 3, bsize, bsize)`` flows."""
        if self.in_channels < 3:
            x = F.pad(x, (0, 0, 0, 0, 0, 3 - self.in_channels))
        return Transformer.forward(self, x)[0]
