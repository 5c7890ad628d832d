"""Optional image preprocessing the original service offered: CLAHE.

``enable_clahe`` (training and inference) turns an image into one grey
channel and equalises its histogram locally with OpenCV's CLAHE (clip limit
3.0, 16x16 tiles), exactly the original service's recipe. It helps
brightfield and phase-contrast images whose intensities span a narrow range,
where Cellpose-SAM otherwise finds nothing. OpenCV comes with cellpose
(``opencv-python-headless``).
"""

from __future__ import annotations

import numpy as np

from cellpose_finetuning.errors import InvalidInput

__all__ = ["CLAHE_CLIP_LIMIT", "CLAHE_TILE_GRID", "apply_clahe", "to_grey_uint8"]

#: The original service's CLAHE parameters.
CLAHE_CLIP_LIMIT = 3.0
CLAHE_TILE_GRID = (16, 16)


def to_grey_uint8(image: np.ndarray) -> np.ndarray:
    """One grey (H, W) uint8 plane from a (C, H, W) image.

    Three or more channels are combined by luminance (0.299 R + 0.587 G +
    0.114 B, the first three channels), fewer take the first channel. Values
    already within 0-255 are kept; any other range is stretched min-max.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise InvalidInput("image", f"expected (C,H,W), got shape {image.shape}")
    planes = image.astype("float32", copy=False)
    if planes.shape[0] >= 3:
        grey = 0.299 * planes[0] + 0.587 * planes[1] + 0.114 * planes[2]
    else:
        grey = planes[0]
    lo, hi = float(grey.min()), float(grey.max())
    if lo >= 0 and hi <= 255:
        return np.clip(np.rint(grey), 0, 255).astype("uint8")
    if hi <= lo:
        return np.zeros(grey.shape, "uint8")
    return np.rint((grey - lo) / (hi - lo) * 255).astype("uint8")


def apply_clahe(image: np.ndarray) -> np.ndarray:
    """CLAHE as the original service applied it.

    Parameters
    ----------
    image : numpy.ndarray
        (C, H, W) image, or a (Z, C, H, W) stack (each plane on its own).

    Returns
    -------
    numpy.ndarray
        (1, H, W) (or (Z, 1, H, W)) float32 image with values 0-255.
    """
    import cv2

    image = np.asarray(image)
    if image.ndim == 4:
        return np.stack([apply_clahe(plane) for plane in image])
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILE_GRID)
    return clahe.apply(to_grey_uint8(image))[None].astype("float32")
