"""Segmentation metrics: pixel foreground scores and instance average precision.

Instance matching is cellpose's own (``cellpose.metrics.average_precision``,
Hungarian matching of IoU), so our numbers are the ones cellpose users know.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellpose_finetuning.engine.schemas import InstanceMetrics, ValidationMetrics

__all__ = ["AP_THRESHOLDS", "instance_metrics", "pixel_metrics", "pixel_metrics_from_counts"]

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


def instance_metrics(
    true_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray]
) -> InstanceMetrics:
    """Average precision at IoU 0.5, 0.75 and 0.9 over a set of images.

    AP per image is cellpose's TP / (TP + FP + FN); the set's AP is the mean
    over images that have any true or predicted object.

    Parameters
    ----------
    true_masks, pred_masks : sequence of numpy.ndarray
        Instance label images, pairwise the same shape.

    Returns
    -------
    InstanceMetrics
    """
    from cellpose.metrics import average_precision

    if len(true_masks) != len(pred_masks):
        raise ValueError("need as many predictions as ground-truth masks")
    if not true_masks:
        raise ValueError("no images to score")
    ap, _tp, _fp, _fn = average_precision(
        [np.asarray(m).astype("int32") for m in true_masks],
        [np.asarray(m).astype("int32") for m in pred_masks],
        threshold=list(AP_THRESHOLDS),
    )
    n_true = sum(int(np.unique(m[m > 0]).size) for m in true_masks)
    n_pred = sum(int(np.unique(m[m > 0]).size) for m in pred_masks)
    with np.errstate(invalid="ignore"):
        mean_ap = np.nanmean(np.asarray(ap, dtype="float64"), axis=0) if len(ap) else ap
    mean_ap = np.nan_to_num(mean_ap, nan=0.0)
    return InstanceMetrics(
        ap_0_5=round(float(mean_ap[0]), 4),
        ap_0_75=round(float(mean_ap[1]), 4),
        ap_0_9=round(float(mean_ap[2]), 4),
        n_true=n_true,
        n_pred=n_pred,
    )
