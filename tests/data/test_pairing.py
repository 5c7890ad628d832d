"""Pairing by folder and by pattern, as the contract describes, over plain name lists."""

from __future__ import annotations

import dataclasses
import time

import pytest

from cellpose_finetuning.data.pairing import (
    Pair,
    is_pattern,
    pair_files,
    safe_relpath,
    select_samples,
    spec_dir,
)
from cellpose_finetuning.errors import InvalidInput


@pytest.fixture(scope="module")
def dev_names(dev_data) -> list[str]:
    """Every file name of the dev dataset, relative to its root (like an artifact listing)."""
    return sorted(p.relative_to(dev_data).as_posix() for p in dev_data.rglob("*") if p.is_file())


def _message(exc: pytest.ExceptionInfo[InvalidInput]) -> str:
    return str(exc.value)


# ------------------------------------------------------------------ the two forms


def test_folder_form_pairs_identical_names(dev_names):
    pairs = pair_files("images/train/", "annotations/train/", dev_names)
    assert [p.key for p in pairs] == [
        "bacteria_t15.tif",
        "bacteria_t17.tif",
        "nuclei_00.tif",
        "nuclei_01.tif",
        "nuclei_02.tif",
    ]
    assert pairs[0] == Pair(
        "images/train/bacteria_t15.tif", "annotations/train/bacteria_t15.tif", "bacteria_t15.tif"
    )


def test_pattern_form_pairs_the_star_part(dev_names):
    pairs = pair_files("images/pattern/*.ome.tif", "annotations/pattern/*_mask.ome.tif", dev_names)
    assert [p.key for p in pairs] == ["t0000", "t0001", "t0002", "t0003", "t0004"]
    assert pairs[1] == Pair(
        "images/pattern/t0001.ome.tif", "annotations/pattern/t0001_mask.ome.tif", "t0001"
    )


def test_folder_form_is_not_recursive():
    names = ["i/a.tif", "m/a.tif", "i/sub/b.tif", "m/sub/b.tif"]
    assert [p.key for p in pair_files("i/", "m/", names)] == ["a.tif"]


def test_star_does_not_cross_folders():
    names = ["i/sub/a.tif", "m/sub/a.tif", "i/b.tif", "m/b.tif"]
    assert [p.key for p in pair_files("i/*.tif", "m/*.tif", names)] == ["b"]


def test_star_matches_at_least_one_character():
    names = ["i/.tif", "m/.tif", "i/a.tif", "m/a.tif"]
    assert [p.key for p in pair_files("i/*.tif", "m/*.tif", names)] == ["a"]


def test_files_that_are_not_images_are_ignored():
    names = ["i/a.png", "i/notes.txt", "m/a.png", "m/a.geojson", "m/README.md"]
    assert len(pair_files("i/", "m/", names)) == 1


def test_names_outside_the_two_folders_are_ignored(dev_names):
    pairs = pair_files("images/test/", "annotations/test/", dev_names)
    assert [p.key for p in pairs] == ["bacteria_t19.tif", "nuclei_03.tif"]


def test_specs_are_normalised():
    names = ["i/a.tif", "m/a.tif"]
    assert pair_files("./i//", "m/./", names)[0].image == "i/a.tif"


def test_data_root_itself_can_hold_the_images():
    names = ["a.tif", "b.tif", "masks/a.tif", "masks/b.tif"]
    assert [p.image for p in pair_files("./", "masks/", names)] == ["a.tif", "b.tif"]


def test_patterns_in_one_folder_give_shared_files_to_the_more_specific():
    names = ["d/a.tif", "d/a_mask.tif", "d/b.tif", "d/b_mask.tif"]
    pairs = pair_files("d/*.tif", "d/*_mask.tif", names)
    assert [(p.image, p.annotation) for p in pairs] == [
        ("d/a.tif", "d/a_mask.tif"),
        ("d/b.tif", "d/b_mask.tif"),
    ]


def test_equally_specific_overlapping_patterns_are_refused():
    with pytest.raises(InvalidInput, match="both match d/a_b.tif"):
        pair_files("d/a_*.tif", "d/*_b.tif", ["d/a_b.tif"])


def test_same_folder_for_images_and_annotations_is_refused():
    with pytest.raises(InvalidInput, match="train_images/train_annotations.*the same"):
        pair_files("d/", "d/", ["d/a.tif"])


def test_natural_sort():
    names = [f"i/img{i}.png" for i in (10, 2, 1)] + [f"m/img{i}.png" for i in (10, 2, 1)]
    assert [p.key for p in pair_files("i/", "m/", names)] == ["img1.png", "img2.png", "img10.png"]


def test_pairs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Pair("a", "b", "k").image = "c"  # type: ignore[misc]


# ------------------------------------------------------------------ unmatched files


def test_images_without_annotation_are_listed():
    with pytest.raises(InvalidInput) as err:
        pair_files("i/", "m/", ["i/a.tif", "i/b.tif", "m/b.tif"])
    assert "1 images in train_images have no annotation in train_annotations" in _message(err)
    assert "i/a.tif" in _message(err) and "i/b.tif" not in _message(err)


def test_annotations_without_image_are_listed():
    with pytest.raises(InvalidInput) as err:
        pair_files("i/*.tif", "m/*_mask.tif", ["i/b.tif", "m/b_mask.tif", "m/c_mask.tif"])
    assert "1 annotations in train_annotations have no image in train_images" in _message(err)
    assert "m/c_mask.tif" in _message(err)


def test_unmatched_files_are_listed_in_both_directions():
    with pytest.raises(InvalidInput) as err:
        pair_files("i/", "m/", ["i/a.tif", "i/b.tif", "m/b.tif", "m/c.tif"])
    assert "i/a.tif" in _message(err) and "m/c.tif" in _message(err)
    assert err.value.what == "train_images/train_annotations"


def test_long_lists_of_unmatched_files_are_shortened():
    names = [f"i/f{i}.tif" for i in range(25)] + ["m/f0.tif"]
    with pytest.raises(InvalidInput) as err:
        pair_files("i/", "m/", names)
    assert "24 images" in _message(err) and "and 14 more" in _message(err)
    assert "i/f1.tif, i/f2.tif" in _message(err)  # natural order


def test_errors_use_the_given_argument_names():
    with pytest.raises(InvalidInput, match="test_images/test_annotations.*test_annotations"):
        pair_files(
            "i/",
            "m/",
            ["i/a.tif", "m/b.tif"],
            images_arg="test_images",
            annotations_arg="test_annotations",
        )


# ------------------------------------------------------------------ malformed specs


@pytest.mark.parametrize(
    ("images", "annotations"),
    [("images/train/", "annotations/train/*.tif"), ("images/train/*.tif", "annotations/train/")],
)
def test_mixed_forms_are_refused_naming_both_arguments(dev_names, images, annotations):
    with pytest.raises(InvalidInput) as err:
        pair_files(images, annotations, dev_names)
    assert err.value.what == "train_images/train_annotations"
    assert "same form" in _message(err)


def test_spec_that_is_neither_folder_nor_pattern_explains_both_forms(dev_names):
    with pytest.raises(InvalidInput) as err:
        pair_files("images/train", "annotations/train/", dev_names)
    assert err.value.what == "train_images"
    assert "ending in '/'" in _message(err) and "'*'" in _message(err)


@pytest.mark.parametrize("spec", ["i/*_*.tif", "i/*/a.tif", "i/a.tif*x*"])
def test_pattern_needs_exactly_one_star_in_the_file_name(spec):
    with pytest.raises(InvalidInput, match="train_images.*exactly one"):
        pair_files(spec, "m/*.tif", ["i/a.tif", "m/a.tif"])


def test_pattern_matching_nothing_says_so_and_counts_the_files(dev_names):
    with pytest.raises(InvalidInput) as err:
        pair_files(
            "images/train/*.png",
            "annotations/train/*.png",
            dev_names,
            images_arg="test_images",
            annotations_arg="test_annotations",
        )
    assert err.value.what == "test_images"
    assert "matches no image files (5 files directly in 'images/train')" in _message(err)


def test_folder_that_is_not_listed_matches_nothing(dev_names):
    with pytest.raises(InvalidInput, match="train_annotations.*matches no image files \\(0 files"):
        pair_files("images/train/", "annotations/nowhere/", dev_names)


@pytest.mark.parametrize(
    "spec", ["../secret/", "/etc/", "s3://bucket/x/", "http://host/x/*.tif", "a/../../b/"]
)
def test_pair_files_refuses_unsafe_specs(spec):
    with pytest.raises(InvalidInput, match="train_images"):
        pair_files(spec, "m/", ["m/a.tif"])


# ------------------------------------------------------------------ scale


def test_2500_pairs_pair_correctly_and_quickly():
    names = [f"images/x/f{i}.tif" for i in range(2500)]
    names += [f"annotations/x/f{i}_mask.tif" for i in reversed(range(2500))]
    t0 = time.perf_counter()
    pairs = pair_files("images/x/*.tif", "annotations/x/*_mask.tif", names)
    assert time.perf_counter() - t0 < 1.0
    assert [p.key for p in pairs] == [f"f{i}" for i in range(2500)]
    assert all(p.annotation == f"annotations/x/{p.key}_mask.tif" for p in pairs)


def test_20000_names_in_the_folder_form_stay_fast():
    names = [f"{d}/sample_{i}.png" for d in ("i", "m") for i in range(10_000)]
    t0 = time.perf_counter()
    assert len(pair_files("i/", "m/", names)) == 10_000
    assert time.perf_counter() - t0 < 2.0


# ------------------------------------------------------------------ paths and specs


@pytest.mark.parametrize(
    "bad",
    [
        "../secret/",
        "a/../../b/",
        "a/..",
        "/etc/",
        "s3://bucket/x/",
        "http://host/x/",
        "file:/etc/passwd",
        "a\\b/",
        "a\x00b/",
        "",
    ],
)
def test_paths_that_could_escape_are_refused_naming_the_argument(bad):
    with pytest.raises(InvalidInput) as err:
        safe_relpath(bad, "train_images")
    assert err.value.what == "train_images"


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("./images//train/", "images/train/"),
        ("images/./t0000.tif", "images/t0000.tif"),
        ("./", "./"),
        ("images/*.tif", "images/*.tif"),
    ],
)
def test_safe_paths_are_normalised(path, normal):
    assert safe_relpath(path, "x") == normal


@pytest.mark.parametrize(
    ("spec", "folder"),
    [
        ("images/train/", "images/train"),
        ("images/p/*_mask.ome.tif", "images/p"),
        ("./images/p/*.tif", "images/p"),
        ("*.png", ""),
        ("./", ""),
    ],
)
def test_spec_dir_is_the_listed_folder(spec, folder):
    assert spec_dir(spec) == folder


def test_is_pattern():
    assert is_pattern("images/*.tif") and not is_pattern("images/")


# ------------------------------------------------------------------ n_samples

PAIRS = [Pair(f"i/{i}.tif", f"m/{i}.tif", str(i)) for i in range(20)]


def test_no_n_samples_keeps_all_pairs():
    assert select_samples(PAIRS, None, seed=0) == PAIRS


def test_more_samples_than_pairs_keeps_all_pairs():
    assert select_samples(PAIRS, 50, seed=0) == PAIRS


def test_same_seed_gives_the_same_subset():
    assert select_samples(PAIRS, 5, seed=7) == select_samples(PAIRS, 5, seed=7)


def test_another_seed_gives_another_subset():
    subsets = {tuple(p.key for p in select_samples(PAIRS, 5, seed=s)) for s in range(5)}
    assert len(subsets) > 1


def test_subset_keeps_the_natural_order():
    chosen = select_samples(PAIRS, 8, seed=3)
    assert len(chosen) == 8 and chosen == sorted(chosen, key=PAIRS.index)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3"])
def test_invalid_n_samples_is_refused(bad):
    with pytest.raises(InvalidInput) as err:
        select_samples(PAIRS, bad, seed=0)
    assert err.value.what == "n_samples"


@pytest.mark.parametrize(("fraction", "expected"), [(0.05, 1), (0.25, 5), (0.5, 10), (0.99, 20)])
def test_fractional_n_samples_is_a_share_of_the_pairs(fraction, expected):
    # The original service: a value in (0, 1) is a fraction, rounded, at least one pair.
    chosen = select_samples(PAIRS, fraction, seed=0)
    assert len(chosen) == expected
    assert chosen == select_samples(PAIRS, fraction, seed=0)


def test_whole_float_n_samples_is_a_count():
    assert len(select_samples(PAIRS, 4.0, seed=0)) == 4


@pytest.mark.parametrize("bad", [1.5, 1.0001, 0.0, -0.5])
def test_fractional_n_samples_above_one_is_refused_naming_it(bad):
    with pytest.raises(InvalidInput, match="n_samples") as err:
        select_samples(PAIRS, bad, seed=0)
    assert err.value.what == "n_samples"
