"""Segmentation metrics: pixel foreground scores and instance average precision.

Instance matching is cellpose's own (``cellpose.metrics.average_precision``,
Hungarian matching of IoU), so our numbers are the ones cellpose users know.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from cellpose_finetuning.engine.schemas import InstanceMetrics, ValidationMetrics

__all__ = [
    "AP_THRESHOLDS",
    "ImageScore",
    "ap_change",
    "instance_metrics",
    "pixel_metrics",
    "pixel_metrics_from_counts",
    "score_masks",
]

#: IoU thresholds of the contract's ``ap_0_5``, ``ap_0_75``, ``ap_0_9``.
AP_THRESHOLDS = (0.5, 0.75, 0.9)


def _ratio(num: float, den: float) -> float:
    # An empty denominator means nothing to get wrong: count it as perfect.
    return float(num / den) if den else 1.0


def pixel_metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> ValidationMetrics:
    """Foreground metrics from confusion counts.

    Parameters
    ----------
    tp, fp, fn, tn : int
        True/false positive/negative pixel counts (positive = foreground).

    Returns
    -------
    ValidationMetrics
        ``pixel_accuracy``, ``precision``, ``recall``, ``f1`` (Dice), ``iou``.
        A ratio whose denominator is 0 is 1.0 (nothing to find, nothing wrong).
    """
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return ValidationMetrics(
        pixel_accuracy=_ratio(tp + tn, tp + fp + fn + tn),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        iou=_ratio(tp, tp + fp + fn),
    )


def pixel_metrics(pred_foreground: np.ndarray, true_labels: np.ndarray) -> ValidationMetrics:
    """Foreground metrics of a boolean prediction against a label image.

    Parameters
    ----------
    pred_foreground : numpy.ndarray of bool
        Predicted foreground (e.g. cell probability logit > 0).
    true_labels : numpy.ndarray of int
        Instance labels; any label > 0 is foreground.
    """
    pred = np.asarray(pred_foreground, dtype=bool)
    true = np.asarray(true_labels) > 0
    if pred.shape != true.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, labels {true.shape}")
    return pixel_metrics_from_counts(
        int(np.sum(pred & true)),
        int(np.sum(pred & ~true)),
        int(np.sum(~pred & true)),
        int(np.sum(~pred & ~true)),
    )


class ImageScore(BaseModel):
    """Instance metrics of one image (cellpose's matching)."""

    image: str
    ap_0_5: float
    ap_0_75: float
    ap_0_9: float
    tp_0_5: int
    fp_0_5: int
    fn_0_5: int
    precision_0_5: float
    recall_0_5: float
    f1_0_5: float
    n_true: int
    n_pred: int


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of object counts.

    With no prediction (or no true object) the undefined ratio is 1.0 only
    when there was nothing to miss (or nothing wrongly found), else 0.0.
    """
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return float(precision), float(recall), float(f1)


def score_masks(
    true_masks: Sequence[np.ndarray],
    pred_masks: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
) -> tuple[InstanceMetrics, list[ImageScore]]:
    """Instance metrics of a set of images, and of each image.

    AP per image is cellpose's TP / (TP + FP + FN) at IoU 0.5, 0.75, 0.9
    (``cellpose.metrics.average_precision``, Hungarian matching, unrounded);
    the set's AP is the mean over images that have any true or predicted
    object. Precision, recall and F1 at IoU 0.5 are computed from the
    matched, false and missed objects summed over the set.

    Parameters
    ----------
    true_masks, pred_masks : sequence of numpy.ndarray
        Instance label images, pairwise the same shape.
    names : sequence of str, optional
        Image names for the per-image rows.

    Returns
    -------
    (InstanceMetrics, list of ImageScore)
    """
    from cellpose.metrics import average_precision

    if len(true_masks) != len(pred_masks):
        raise ValueError("need as many predictions as ground-truth masks")
    if not true_masks:
        raise ValueError("no images to score")
    names = list(names) if names is not None else [f"image[{i}]" for i in range(len(true_masks))]
    ap, tp, fp, fn = average_precision(
        [np.asarray(m).astype("int32") for m in true_masks],
        [np.asarray(m).astype("int32") for m in pred_masks],
        threshold=list(AP_THRESHOLDS),
    )
    ap = np.asarray(ap, dtype="float64").reshape(len(true_masks), len(AP_THRESHOLDS))
    tp, fp, fn = (np.asarray(x).reshape(ap.shape).astype("int64") for x in (tp, fp, fn))
    rows = []
    for i, name in enumerate(names):
        t, f, n = int(tp[i, 0]), int(fp[i, 0]), int(fn[i, 0])
        precision, recall, f1 = _prf(t, f, n)
        rows.append(
            ImageScore(
                image=name,
                ap_0_5=float(np.nan_to_num(ap[i, 0])),
                ap_0_75=float(np.nan_to_num(ap[i, 1])),
                ap_0_9=float(np.nan_to_num(ap[i, 2])),
                tp_0_5=t,
                fp_0_5=f,
                fn_0_5=n,
                precision_0_5=precision,
                recall_0_5=recall,
                f1_0_5=f1,
                n_true=int(np.unique(true_masks[i][true_masks[i] > 0]).size),
                n_pred=int(np.unique(pred_masks[i][pred_masks[i] > 0]).size),
            )
        )
    with np.errstate(invalid="ignore"):
        mean_ap = np.nanmean(ap, axis=0) if np.isfinite(ap).any() else np.zeros(ap.shape[1])
    mean_ap = np.nan_to_num(mean_ap, nan=0.0)
    precision, recall, f1 = _prf(int(tp[:, 0].sum()), int(fp[:, 0].sum()), int(fn[:, 0].sum()))
    metrics = InstanceMetrics(
        ap_0_5=float(mean_ap[0]),
        ap_0_75=float(mean_ap[1]),
        ap_0_9=float(mean_ap[2]),
        n_true=sum(r.n_true for r in rows),
        n_pred=sum(r.n_pred for r in rows),
        precision_0_5=precision,
        recall_0_5=recall,
        f1_0_5=f1,
    )
    return metrics, rows


def instance_metrics(
    true_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray]
) -> InstanceMetrics:
    """Average precision at IoU 0.5, 0.75 and 0.9 over a set of images.

    The set-level part of :func:`score_masks`.

    Parameters
    ----------
    true_masks, pred_masks : sequence of numpy.ndarray
        Instance label images, pairwise the same shape.

    Returns
    -------
    InstanceMetrics
    """
    return score_masks(true_masks, pred_masks)[0]


def ap_change(base: InstanceMetrics | None, final: InstanceMetrics | None) -> str:
    """One line comparing the starting and the fine-tuned model: "AP@0.5 0.31 → 0.62 (+0.31)".

    Says plainly when the fine-tuned model is worse. Empty when either is unknown.
    """
    if base is None or final is None:
        return ""
    delta = final.ap_0_5 - base.ap_0_5
    text = f"AP@0.5 {base.ap_0_5:.2f} → {final.ap_0_5:.2f} ({delta:+.2f})"
    if delta < 0:
        text += ": the fine-tuned model is WORSE than the base on the test set"
    elif delta == 0:
        text += ": no change on the test set"
    return text
