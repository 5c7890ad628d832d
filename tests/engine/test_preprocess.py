"""CLAHE as the original service applied it (grey, clip limit 3, 16x16 tiles)."""

from __future__ import annotations

import numpy as np

from cellpose_finetuning.engine.preprocess import apply_clahe, to_grey_uint8


def test_grey_uses_luminance_and_stretches_other_ranges():
    rgb = np.zeros((3, 4, 4), "float32")
    rgb[0], rgb[1], rgb[2] = 100, 200, 50
    assert np.all(to_grey_uint8(rgb) == round(0.299 * 100 + 0.587 * 200 + 0.114 * 50))
    wide = np.linspace(1000, 5000, 16, dtype="float32").reshape(1, 4, 4)
    grey = to_grey_uint8(wide)
    assert grey.min() == 0 and grey.max() == 255


def test_clahe_widens_a_narrow_intensity_range():
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(19, 82, (1, 128, 128)).astype("float32")  # brightfield-like
    out = apply_clahe(img)
    assert out.shape == (1, 128, 128) and out.dtype == np.float32
    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(16, 16)).apply(img[0].astype("uint8"))
    assert np.array_equal(out[0], expected)
    assert out.std() > img.std()


def test_clahe_on_a_stack_works_plane_by_plane():
    stack = np.random.default_rng(1).integers(0, 255, (3, 2, 32, 32)).astype("float32")
    out = apply_clahe(stack)
    assert out.shape == (3, 1, 32, 32)
    assert np.array_equal(out[1], apply_clahe(stack[1]))
