"""Metrics, checked against cellpose's own on real masks."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from cellpose.metrics import average_precision

from cellpose_finetuning.engine.metrics import instance_metrics, pixel_metrics


def _degrade(mask: np.ndarray, seed: int) -> np.ndarray:
    """Drop some objects, shift the image by 2 px and add a false object."""
    rng = np.random.default_rng(seed)
    out = mask.copy()
    ids = np.unique(out[out > 0])
    out[np.isin(out, rng.choice(ids, size=len(ids) // 4, replace=False))] = 0
    out = np.roll(out, 2, axis=1)
    out[:6, :6] = out.max() + 1
    return out


def test_instance_metrics_match_cellpose_average_precision(test_pairs):
    true = [tifffile.imread(m).astype("int32") for _, m in test_pairs]
    pred = [_degrade(m, i) for i, m in enumerate(true)]
    ours = instance_metrics(true, pred)
    ap, _, _, _ = average_precision(true, pred, threshold=[0.5, 0.75, 0.9])
    expected = np.nanmean(ap, axis=0)
    assert ours.ap_0_5 == pytest.approx(expected[0], abs=1e-4)
    assert ours.ap_0_75 == pytest.approx(expected[1], abs=1e-4)
    assert ours.ap_0_9 == pytest.approx(expected[2], abs=1e-4)
    assert ours.n_true == sum(len(np.unique(m)) - 1 for m in true)
    assert ours.n_pred == sum(len(np.unique(m)) - 1 for m in pred)
    assert 0 < ours.ap_0_5 < 1


def test_perfect_prediction_scores_one(test_pairs):
    true = [tifffile.imread(m) for _, m in test_pairs]
    ours = instance_metrics(true, true)
    assert (ours.ap_0_5, ours.ap_0_75, ours.ap_0_9) == (1.0, 1.0, 1.0)


def test_pixel_metrics_on_a_hand_counted_example():
    true = np.array([[0, 1, 1], [0, 2, 0]])
    pred = np.array([[True, True, False], [False, True, False]])
    m = pixel_metrics(pred, true)  # tp=2 fp=1 fn=1 tn=2
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.iou == pytest.approx(0.5)
    assert m.pixel_accuracy == pytest.approx(4 / 6)


def test_pixel_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        pixel_metrics(np.zeros((2, 2), bool), np.zeros((3, 2), int))


def test_score_masks_equals_cellpose_average_precision_per_image_and_mean(test_pairs):
    from cellpose_finetuning.engine.metrics import score_masks

    true = [tifffile.imread(m).astype("int32") for _, m in test_pairs]
    pred = [_degrade(m, i + 7) for i, m in enumerate(true)]
    mean, rows = score_masks(true, pred, ["a", "b"])
    ap, tp, fp, fn = average_precision(true, pred, threshold=[0.5, 0.75, 0.9])
    for i, row in enumerate(rows):
        assert [row.ap_0_5, row.ap_0_75, row.ap_0_9] == pytest.approx(ap[i], abs=1e-6)
        assert (row.tp_0_5, row.fp_0_5, row.fn_0_5) == (tp[i, 0], fp[i, 0], fn[i, 0])
    assert [mean.ap_0_5, mean.ap_0_75, mean.ap_0_9] == pytest.approx(
        np.nanmean(ap, axis=0), abs=1e-6
    )
    t, f, n = tp[:, 0].sum(), fp[:, 0].sum(), fn[:, 0].sum()
    assert mean.precision_0_5 == pytest.approx(t / (t + f))
    assert mean.recall_0_5 == pytest.approx(t / (t + n))
    assert mean.f1_0_5 == pytest.approx(2 * t / (2 * t + f + n))
    assert 0 < mean.f1_0_5 < 1 and [r.image for r in rows] == ["a", "b"]


def test_no_prediction_scores_zero_recall_and_precision(test_pairs):
    from cellpose_finetuning.engine.metrics import score_masks

    true = [tifffile.imread(m) for _, m in test_pairs]
    mean, rows = score_masks(true, [np.zeros_like(m) for m in true])
    assert (mean.ap_0_5, mean.precision_0_5, mean.recall_0_5, mean.f1_0_5) == (0, 0, 0, 0)
    assert rows[0].n_pred == 0 and rows[0].fn_0_5 == rows[0].n_true > 0


def test_ap_change_says_plainly_when_fine_tuning_made_it_worse():
    from cellpose_finetuning.engine.metrics import ap_change
    from cellpose_finetuning.engine.schemas import InstanceMetrics

    def im(ap):
        return InstanceMetrics(ap_0_5=ap, ap_0_75=0, ap_0_9=0, n_true=1, n_pred=1)

    assert ap_change(im(0.31), im(0.62)) == "AP@0.5 0.31 → 0.62 (+0.31)"
    assert "WORSE" in ap_change(im(0.62), im(0.31)) and "(-0.31)" in ap_change(im(0.62), im(0.31))
    assert ap_change(None, im(0.5)) == ""
