"""Training data for a run: image/mask pairs read and prepared as cellpose's ``train_seg`` does.

Reading goes through :mod:`cellpose_finetuning.io.images`; the preparation
(flows, diameters, normalisation, dropping masks with too few objects) is
cellpose's ``_process_train_test`` (through :mod:`cellpose_finetuning.engine.cellpose_compat`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import InvalidInput

if TYPE_CHECKING:
    import torch

__all__ = ["PreparedData", "load_pairs", "prepare_arrays", "prepare_session_data"]


@dataclass
class PreparedData:
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


def load_pairs(
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
    from cellpose_finetuning.io.images import read_image
    from cellpose_finetuning.io.masks import read_mask

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


def prepare_session_data(
    session: Session, settings: TrainingSettings, device: torch.device
) -> PreparedData:
    """Load and prepare a session's training and test pairs (see :func:`prepare_arrays`)."""
    data = session.data
    return prepare_arrays(
        load_pairs(
            data.train, "training", data.source.get("max_pixels"), clahe=settings.enable_clahe
        ),
        load_pairs(data.test, "test", data.source.get("max_pixels"), clahe=settings.enable_clahe),
        [m for _, m in data.train],
        settings,
        device,
    )


def prepare_arrays(
    train: list[tuple[np.ndarray, np.ndarray]],
    test: list[tuple[np.ndarray, np.ndarray]],
    train_names: list[str],
    settings: TrainingSettings,
    device: torch.device,
) -> PreparedData:
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
    return PreparedData(
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
