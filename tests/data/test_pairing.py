"""Pairing by folder and by pattern, as the contract describes."""

from __future__ import annotations

import time

import pytest

from cellpose_finetuning.data.local import pair_local, pair_local_specs
from cellpose_finetuning.data.pairing import pair_files, safe_relpath
from cellpose_finetuning.errors import InvalidInput

DEV_NAMES = [
    *(f"images/train/{n}.tif" for n in ("nuclei_00", "nuclei_01", "bacteria_t15")),
    *(f"annotations/train/{n}.tif" for n in ("nuclei_00", "nuclei_01", "bacteria_t15")),
    *(f"images/pattern/t000{i}.ome.tif" for i in range(3)),
    *(f"annotations/pattern/t000{i}_mask.ome.tif" for i in range(3)),
]


def test_folder_form_pairs_identical_names():
    pairs = pair_files("images/train/", "annotations/train/", DEV_NAMES)
    assert [(p.image, p.annotation) for p in pairs][0] == (
        "images/train/bacteria_t15.tif",
        "annotations/train/bacteria_t15.tif",
    )
    assert len(pairs) == 3


def test_pattern_form_pairs_the_star_part():
    pairs = pair_files("images/pattern/*.ome.tif", "annotations/pattern/*_mask.ome.tif", DEV_NAMES)
    assert [p.key for p in pairs] == ["t0000", "t0001", "t0002"]
    assert pairs[1].annotation == "annotations/pattern/t0001_mask.ome.tif"


def test_natural_sort():
    names = [f"i/img{i}.png" for i in (10, 2, 1)] + [f"m/img{i}.png" for i in (10, 2, 1)]
    assert [p.key for p in pair_files("i/", "m/", names)] == ["img1.png", "img2.png", "img10.png"]


def test_unmatched_files_are_listed_in_both_directions():
    names = ["i/a.tif", "i/b.tif", "m/b.tif", "m/c.tif"]
    with pytest.raises(InvalidInput) as err:
        pair_files("i/", "m/", names)
    assert "i/a.tif" in str(err.value) and "m/c.tif" in str(err.value)
    assert "train_images" in str(err.value)


def test_mixed_forms_are_refused_naming_both_arguments():
    with pytest.raises(InvalidInput, match="train_images/train_annotations.*same form"):
        pair_files("images/train/", "annotations/train/*.tif", DEV_NAMES)


def test_pattern_matching_nothing_says_so():
    with pytest.raises(InvalidInput, match="test_images.*matches no image files"):
        pair_files(
            "images/train/*.png",
            "annotations/train/*.png",
            DEV_NAMES,
            images_arg="test_images",
            annotations_arg="test_annotations",
        )


def test_spec_that_is_neither_folder_nor_pattern_is_explained():
    with pytest.raises(InvalidInput, match="ending in '/'"):
        pair_files("images/train", "annotations/train/", DEV_NAMES)


def test_star_does_not_cross_folders():
    names = ["i/sub/a.tif", "m/sub/a.tif", "i/b.tif", "m/b.tif"]
    assert [p.key for p in pair_files("i/*.tif", "m/*.tif", names)] == ["b"]


def test_2500_pairs_pair_quickly():
    names = [f"images/x/f{i:05d}.tif" for i in range(2500)]
    names += [f"annotations/x/f{i:05d}_mask.tif" for i in range(2500)]
    t0 = time.perf_counter()
    pairs = pair_files("images/x/*.tif", "annotations/x/*_mask.tif", names)
    assert len(pairs) == 2500 and time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("bad", ["../secret/", "/etc/", "s3://bucket/x/", "a/../../b/", "a\\b/"])
def test_paths_that_could_escape_are_refused(bad):
    with pytest.raises(InvalidInput, match="train_images"):
        safe_relpath(bad, "train_images")


def test_local_pairing_of_the_dev_folders(dev_data):
    pairs = pair_local(dev_data, "images/pattern/*.ome.tif", "annotations/pattern/*_mask.ome.tif")
    assert len(pairs) == 5 and all(a.is_file() and b.is_file() for a, b in pairs)


def test_local_specs_as_cli_paths(dev_data):
    pairs = pair_local_specs(f"{dev_data}/images/train/", f"{dev_data}/annotations/train/")
    assert len(pairs) == 5


def test_local_folder_without_slash_is_explained(dev_data):
    with pytest.raises(InvalidInput, match="end a folder with '/'"):
        pair_local_specs(f"{dev_data}/images/train", f"{dev_data}/annotations/train/")


def test_symlink_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidInput, match="outside"):
        pair_local(tmp_path / "root", "link/", "link2/")
