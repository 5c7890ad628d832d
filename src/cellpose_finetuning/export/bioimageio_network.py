"""The Cellpose-SAM network alone (the ``model.py`` of a standard-form export).

This file is copied unchanged into every standard-form BioImage.IO package
we export, as ``model.py``, and named there as the architecture of the
``pytorch_state_dict`` weights. It needs only ``cellpose`` (which brings
``torch`` and ``segment_anything``), not ``cellpose_finetuning``.

:class:`CellposeSAMFlows` *is* cellpose's ``Transformer`` (the network of
Cellpose-SAM) built with the encoder size given as keyword arguments, so the
weights file is a plain cellpose state dict that loads here with
``strict=True`` and into cellpose itself. Unlike the labels-out wrapper
(``bioimageio_model.py``) it runs only the network: the package describes
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
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from cellpose.vit_sam import Transformer
from segment_anything.build_sam import sam_model_registry

__all__ = ["CellposeSAMFlows"]


def _encoder_builder(
    embed_dim: int, depth: int, num_heads: int, global_attn_indexes: Sequence[int]
) -> Any:
    """A ``sam_model_registry``-style builder of SAM's ViT image encoder.

    ``Transformer`` reads only ``.image_encoder``; SAM's prompt encoder and
    mask decoder are not built. The fixed values are SAM's own (and the ones
    ``Transformer`` relies on: 1024 px, 16 px patches, 256 output channels).
    """
    from segment_anything.modeling import ImageEncoderViT

    def build(checkpoint: Any = None) -> SimpleNamespace:
        encoder = ImageEncoderViT(
            depth=depth,
            embed_dim=embed_dim,
            img_size=1024,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=num_heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(global_attn_indexes),
            window_size=14,
            out_chans=256,
        )
        return SimpleNamespace(image_encoder=encoder)

    return build


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
        key = f"cellpose_sam_flows:{embed_dim}:{depth}:{num_heads}:{tuple(global_attn_indexes)}"
        # Transformer looks its encoder up in SAM's registry by name.
        sam_model_registry.setdefault(
            key, _encoder_builder(embed_dim, depth, num_heads, global_attn_indexes)
        )
        super().__init__(backbone=key, ps=ps, nout=nout, bsize=bsize, dtype=torch.float32)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``(B, C, bsize, bsize)`` normalised tiles -> ``(B, 3, bsize, bsize)`` flows."""
        if self.in_channels < 3:
            x = F.pad(x, (0, 0, 0, 0, 0, 3 - self.in_channels))
        return Transformer.forward(self, x)[0]
