"""Reading and writing images and masks (see :mod:`cellpose_finetuning.io.images` and
:mod:`cellpose_finetuning.io.masks`)."""

from cellpose_finetuning.io.images import (
    CHANNEL_AXIS_RULE,
    DEFAULT_MAX_PIXELS,
    SUPPORTED_IMAGE_SUFFIXES,
    infer_axes,
    is_image_file,
    read_image,
    to_canonical,
    write_image,
)
from cellpose_finetuning.io.masks import read_mask, validate_mask, write_mask

__all__ = [
    "CHANNEL_AXIS_RULE",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_IMAGE_SUFFIXES",
    "infer_axes",
    "is_image_file",
    "read_image",
    "read_mask",
    "to_canonical",
    "validate_mask",
    "write_image",
    "write_mask",
]
