"""SAM's ViT image encoder, of any size, where cellpose's ``Transformer`` looks it up.

The one source of the encoder builder: :func:`cellpose_finetuning.engine.models.build_network`
imports it, and the export writes this module's text into every BioImage.IO
package's ``model.py`` in place of its import, so a package needs only
``cellpose`` (which brings ``torch`` and ``segment_anything``). Keep it free of
``cellpose_finetuning`` imports and of a module-level ``torch`` import.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any


def encoder_builder(
    embed_dim: int, depth: int, num_heads: int, global_attn_indexes: Sequence[int]
) -> Any:
    """A ``sam_model_registry``-style builder of SAM's ViT image encoder.

    ``Transformer`` reads only ``.image_encoder``; SAM's prompt encoder and
    mask decoder are not built. The fixed values are SAM's own (and the ones
    ``Transformer`` relies on: 1024 px, 16 px patches, 256 output channels).
    """

    def build(checkpoint: Any = None) -> SimpleNamespace:
        import torch
        from segment_anything.modeling import ImageEncoderViT

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


def register_encoder(
    key: str, embed_dim: int, depth: int, num_heads: int, global_attn_indexes: Sequence[int]
) -> str:
    """Register the encoder under ``key`` in SAM's registry (once); returns ``key``.

    ``Transformer(backbone=key)`` looks its encoder up there by name.
    """
    from segment_anything.build_sam import sam_model_registry

    sam_model_registry.setdefault(
        key, encoder_builder(embed_dim, depth, num_heads, global_attn_indexes)
    )
    return key
