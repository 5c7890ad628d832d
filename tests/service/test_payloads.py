"""Answer shapes for the original's clients: json_safe PNG overlays, export metadata."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.service.payloads import (
    MODEL_NAME,
    default_model_name,
    encode_mask_png,
    normalize_authors,
    normalize_uploader,
)


def test_png_overlay_has_the_originals_colours_and_counts():
    labels = np.zeros((5, 7), "uint32")
    labels[1:3, 1:3] = 1
    labels[3, 4:7] = 70000  # beyond uint16
    payload = encode_mask_png(labels)
    assert payload["encoding"] == "mask_png_base64"
    assert (payload["width"], payload["height"], payload["object_count"]) == (7, 5, 2)
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["png_base64"]))))
    assert tuple(rgba[1, 1]) == (123, 231, 73, 150)
    assert tuple(rgba[3, 5]) == ((70000 * 123) % 255, (70000 * 231) % 255, (70000 * 73) % 255, 150)
    assert tuple(rgba[0, 0]) == (0, 0, 0, 0)


def test_png_overlay_needs_2d_labels():
    with pytest.raises(InvalidInput, match="json_safe"):
        encode_mask_png(np.zeros((2, 3, 4), "uint16"))


def test_authors_and_uploader_are_checked_naming_the_entry():
    assert normalize_authors([{"name": " Ada ", "affiliation": "KTH"}, "Bo"]) == [
        {"name": "Ada", "affiliation": "KTH"},
        {"name": "Bo"},
    ]
    assert normalize_authors(None) is None
    with pytest.raises(InvalidInput, match=r"authors\[1\]\.name"):
        normalize_authors([{"name": "A"}, {"affiliation": "x"}])
    with pytest.raises(InvalidInput, match="authors"):
        normalize_authors([])
    assert normalize_uploader({"name": "A", "email": "a@b.c"}) == {"name": "A", "email": "a@b.c"}
    with pytest.raises(InvalidInput, match=r"uploader\.email"):
        normalize_uploader({"name": "A"})


def test_default_model_name_is_a_valid_alias():
    name = default_model_name("20261202-001500-ABCdef12")
    assert name == "cellpose-20261202-001500-abcdef12" and MODEL_NAME.fullmatch(name)
