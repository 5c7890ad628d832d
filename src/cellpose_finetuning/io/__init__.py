"""Reading images and masks (see :mod:`cellpose_finetuning.io.images`)."""

from cellpose_finetuning.io.images import (
    SUPPORTED_IMAGE_SUFFIXES,
    infer_axes,
    is_image_file,
    read_image,
    read_mask,
    to_canonical,
    validate_mask,
    write_mask,
)

__all__ = [
    "SUPPORTED_IMAGE_SUFFIXES",
    "infer_axes",
    "is_image_file",
    "read_image",
    "read_mask",
    "to_canonical",
    "validate_mask",
    "write_mask",
]
