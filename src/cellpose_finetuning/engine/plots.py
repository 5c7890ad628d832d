"""Pictures: training curves and mask overlays.

Drawn with matplotlib's non-interactive Agg backend, so they work on a
server with no display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellpose_finetuning.engine.schemas import TrainingStatus

if TYPE_CHECKING:
    from cellpose_finetuning.engine.evaluation import EvaluationReport, Labelled

__all__ = [
    "label_colors",
    "normalize_for_display",
    "overlay_masks",
    "plot_evaluation_bars",
    "plot_evaluation_overlays",
    "plot_training_curves",
]


def plot_training_curves(status: TrainingStatus, path: str | os.PathLike[str]) -> Path:
    """Draw train/test loss and test F1/IoU per epoch into a PNG.

    Parameters
    ----------
    status : TrainingStatus
        A session's status (its loss and metric histories).
    path : path-like
        Where to write the PNG.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(status.train_losses) + 1)
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot(epochs, status.train_losses, "o-", label="train loss", color="tab:blue")
    val = [(e, v) for e, v in zip(epochs, status.test_losses, strict=False) if v is not None]
    if val:
        ax_loss.plot(*zip(*val, strict=True), "s--", label="test loss", color="tab:orange")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    mets = [(e, m) for e, m in zip(epochs, status.test_metrics, strict=False) if m is not None]
    if mets:
        ep = [e for e, _ in mets]
        ax_metric.plot(ep, [m.f1 for _, m in mets], "o-", label="F1 (pixel)", color="tab:green")
        ax_metric.plot(ep, [m.iou for _, m in mets], "s--", label="IoU (pixel)", color="tab:red")
        ax_metric.set_ylim(0, 1.02)
        ax_metric.legend()
    else:
        ax_metric.text(0.5, 0.5, "no test data", ha="center", va="center")
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("Validation (foreground)")
    ax_metric.grid(alpha=0.3)
    im, base = status.instance_metrics, status.base_instance_metrics
    if base is not None and mets:
        # The starting model's instance AP as a reference line, the end's as a point.
        ax_metric.axhline(
            base.ap_0_5, color="tab:gray", ls=":", lw=1.5, label=f"AP@0.5 base {base.ap_0_5:.2f}"
        )
        if im is not None:
            ax_metric.plot(
                [epochs[-1]], [im.ap_0_5], "D", color="black", label=f"AP@0.5 final {im.ap_0_5:.2f}"
            )
        ax_metric.legend()
    title = f"Session {status.session_id} — {status.status_type}"
    if im is not None:
        from cellpose_finetuning.engine.metrics import ap_change

        change = ap_change(base, im)
        title += f" — {change}" if change else f" — AP@0.5 {im.ap_0_5:.3f}"
        title += f" ({im.n_pred} predicted / {im.n_true} true)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def normalize_for_display(image: np.ndarray) -> np.ndarray:
    """Turn a (C,H,W) or (H,W) image into an (H,W,3) float RGB in [0, 1].

    Each channel is stretched between its 1st and 99th percentile; one
    channel becomes grey, two become red/green.
    """
    img = np.asarray(image, dtype="float32")
    if img.ndim == 2:
        img = img[None]
    chans = []
    for ch in img[:3]:
        lo, hi = np.percentile(ch, [1, 99])
        chans.append(np.clip((ch - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(ch))
    if len(chans) == 1:
        chans = chans * 3
    elif len(chans) == 2:
        chans.append(np.zeros_like(chans[0]))
    return np.stack(chans, axis=-1)


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct-looking random RGB colours in [0, 1] (row 0 is black)."""
    rng = np.random.default_rng(seed)
    colors = rng.uniform(0.25, 1.0, size=(n + 1, 3))
    colors[0] = 0
    return colors


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend instance masks in random colours over an image, with outlines.

    Parameters
    ----------
    image : numpy.ndarray
        (C,H,W) or (H,W) image.
    masks : numpy.ndarray
        (H,W) instance labels, 0 = background.
    alpha : float
        Opacity of the fill.

    Returns
    -------
    numpy.ndarray
        (H,W,3) uint8 RGB picture.
    """
    rgb = normalize_for_display(image)
    masks = np.asarray(masks)
    if masks.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {masks.shape} does not match image {rgb.shape[:2]}")
    colors = label_colors(int(masks.max()))
    fill = colors[masks]
    inside = masks > 0
    out = rgb.copy()
    out[inside] = (1 - alpha) * rgb[inside] + alpha * fill[inside]
    edge = np.zeros_like(inside)
    edge[1:, :] |= masks[1:, :] != masks[:-1, :]
    edge[:, 1:] |= masks[:, 1:] != masks[:, :-1]
    edge &= inside
    out[edge] = fill[edge]
    return (out * 255).round().astype("uint8")


def _save(fig: object, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)  # type: ignore[attr-defined]
    os.replace(tmp, path)
    return path


def plot_evaluation_bars(report: EvaluationReport, path: str | os.PathLike[str]) -> Path:
    """Bar chart of AP@0.5 per image (and the mean), one bar per model.

    Parameters
    ----------
    report : EvaluationReport
        From :func:`cellpose_finetuning.engine.evaluation.evaluate_predictors`.
    path : path-like
        Where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    groups = [*report.images, "mean"]
    n_models = len(report.models)
    width = 0.8 / max(1, n_models)
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, n_models) ** 0.5 + 2), 4), dpi=100)
    ax = fig.subplots()
    x = np.arange(len(groups))
    for k, m in enumerate(report.models):
        values = [row.ap_0_5 for row in m.images] + [m.metrics.ap_0_5]
        bars = ax.bar(x + (k - (n_models - 1) / 2) * width, values, width, label=m.model)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("AP@0.5")
    ax.set_title("Average precision at IoU 0.5, per image")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_evaluation_overlays(
    report: EvaluationReport,
    data: Sequence[Labelled],
    predictions: Mapping[str, Sequence[np.ndarray]],
    path: str | os.PathLike[str],
    *,
    max_images: int = 4,
) -> Path:
    """Side by side per image: the image, the ground truth, then each model's masks.

    Each model's panel is titled with its AP@0.5 and object count on that image.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = list(data)[:max_images]
    ncols = 2 + len(report.models)
    fig = Figure(figsize=(3.2 * ncols, 3.3 * len(rows)), dpi=100)
    axes = np.atleast_2d(fig.subplots(len(rows), ncols, squeeze=False))
    for i, (name, image, truth) in enumerate(rows):
        panels = [
            (normalize_for_display(image), f"{name}"),
            (overlay_masks(image, truth), f"ground truth: {int(np.unique(truth[truth > 0]).size)}"),
        ]
        for m in report.models:
            pred = predictions[m.model][i]
            row = m.images[i]
            title = f"{m.model}\nAP@0.5 {row.ap_0_5:.2f}, {row.n_pred} objects"
            panels.append((overlay_masks(image, pred), title))
        for ax, (picture, title) in zip(axes[i], panels, strict=True):
            ax.imshow(picture)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
