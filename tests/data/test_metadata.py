"""Pairing from metadata JSON files (the original service's ``metadata_dir``)."""

from __future__ import annotations

import pytest

from cellpose_finetuning.data.metadata import load_metadata_document, pairs_from_metadata
from cellpose_finetuning.errors import InvalidInput

NAMES = [
    "images/a1.tif",
    "images/a2.tif",
    "images/a10.tif",
    "masks/a1.tif",
    "masks/a2.tif",
    "masks/a10.tif",
    "meta/local.tif",
    "meta/local_mask.tif",
]


def test_records_in_a_list_with_the_original_key_spellings():
    doc = [
        {"image_path": "images/a2.tif", "mask_path": "masks/a2.tif"},
        {"imagePath": "/images/a10.tif", "annotationPath": "/masks/a10.tif"},
        {"image": {"path": "images/a1.tif"}, "label": {"file": "masks/a1.tif"}},
    ]
    train, test = pairs_from_metadata({"meta/pairs.json": doc}, NAMES)
    assert [(p.image, p.annotation) for p in train] == [
        ("images/a1.tif", "masks/a1.tif"),
        ("images/a2.tif", "masks/a2.tif"),
        ("images/a10.tif", "masks/a10.tif"),
    ]
    assert test == []


def test_nested_records_splits_and_names_relative_to_the_json_file():
    doc = {
        "dataset": "x",
        "samples": [
            {"img": "local.tif", "gt": "./local_mask.tif", "split": "val"},
            {"input": "images/a1.tif", "target": "masks/a1.tif", "subset": "train"},
            {"image": "https://example.org/x.tif", "mask": "masks/a2.tif"},  # URL: skipped
        ],
    }
    train, test = pairs_from_metadata({"meta/index.json": doc}, NAMES)
    assert [p.image for p in train] == ["images/a1.tif"]
    assert [(p.image, p.annotation) for p in test] == [("meta/local.tif", "meta/local_mask.tif")]


def test_a_listed_file_missing_from_the_dataset_is_named():
    doc = [{"image": "images/a1.tif", "mask": "masks/nope.tif"}]
    with pytest.raises(InvalidInput, match=r"metadata_dir.*meta/p\.json: masks/nope\.tif"):
        pairs_from_metadata({"meta/p.json": doc}, NAMES)


def test_paths_leaving_the_dataset_are_refused():
    doc = [{"image": "../../etc/passwd", "mask": "masks/a1.tif"}]
    with pytest.raises(InvalidInput, match=r"'\.\.' is not allowed"):
        pairs_from_metadata({"meta/p.json": doc}, NAMES)


def test_malformed_json_names_the_file():
    with pytest.raises(InvalidInput, match=r"metadata_dir: meta/bad\.json.*not valid JSON"):
        load_metadata_document(b"{not json", "meta/bad.json")


def test_documents_without_records_give_no_pairs():
    assert pairs_from_metadata({"m.json": {"version": 1, "notes": ["a"]}}, NAMES) == ([], [])
