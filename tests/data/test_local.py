"""Local folders: listing under a root without leaving it, and command-line paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellpose_finetuning.data.local import (
    list_files,
    pair_local,
    pair_local_specs,
    split_local_spec,
)
from cellpose_finetuning.errors import InvalidInput


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


# ------------------------------------------------------------------ list_files


def test_list_files_gives_names_directly_in_the_folder(tmp_path):
    _touch(tmp_path, "i/a.tif", "i/b.png", "i/sub/c.tif", "m/a.tif")
    assert sorted(list_files(tmp_path, "i/", "train_images")) == ["i/a.tif", "i/b.png"]


def test_list_files_uses_the_folder_of_a_pattern(tmp_path):
    _touch(tmp_path, "i/a.tif", "i/b.png")
    assert len(list_files(tmp_path, "i/*.tif", "train_images")) == 2


def test_list_files_of_a_missing_folder_names_the_argument(tmp_path):
    with pytest.raises(InvalidInput, match="train_images.*'nowhere' does not exist"):
        list_files(tmp_path, "nowhere/", "train_images")


@pytest.mark.parametrize("spec", ["../", "../outside/", "/etc/", "i/../../x/"])
def test_list_files_refuses_specs_leaving_the_root(tmp_path, spec):
    with pytest.raises(InvalidInput) as err:
        list_files(tmp_path / "root", spec, "train_images")
    assert err.value.what == "train_images"


def test_folder_link_out_of_the_root_is_refused(tmp_path):
    _touch(tmp_path, "outside/a.tif")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidInput, match="train_images.*'link/' leads outside"):
        list_files(tmp_path / "root", "link/", "train_images")


def test_file_link_out_of_the_root_is_refused_naming_the_file(tmp_path):
    _touch(tmp_path, "outside/secret.tif", "root/i/a.tif")
    (tmp_path / "root" / "i" / "b.tif").symlink_to(tmp_path / "outside" / "secret.tif")
    with pytest.raises(InvalidInput, match="train_images.*'i/b.tif' is a link to a file outside"):
        list_files(tmp_path / "root", "i/", "train_images")


def test_file_links_outside_can_be_allowed(tmp_path):
    _touch(tmp_path, "outside/secret.tif", "root/i/a.tif")
    (tmp_path / "root" / "i" / "b.tif").symlink_to(tmp_path / "outside" / "secret.tif")
    names = list_files(tmp_path / "root", "i/", "x", allow_links_outside=True)
    assert sorted(names) == ["i/a.tif", "i/b.tif"]


def test_links_inside_the_root_keep_the_spec_folder_name(tmp_path):
    _touch(tmp_path, "real/a.tif")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert list_files(tmp_path, "alias/", "train_images") == ["alias/a.tif"]


def test_broken_links_are_skipped(tmp_path):
    _touch(tmp_path, "i/a.tif")
    (tmp_path / "i" / "gone.tif").symlink_to(tmp_path / "nothing.tif")
    assert list_files(tmp_path, "i/", "train_images") == ["i/a.tif"]


# ------------------------------------------------------------------ pair_local


def test_local_pairing_of_the_dev_pattern_folders(dev_data):
    pairs = pair_local(dev_data, "images/pattern/*.ome.tif", "annotations/pattern/*_mask.ome.tif")
    assert len(pairs) == 5
    assert pairs[0] == (
        dev_data.resolve() / "images/pattern/t0000.ome.tif",
        dev_data.resolve() / "annotations/pattern/t0000_mask.ome.tif",
    )


def test_local_pairing_of_the_dev_train_folders(dev_data):
    pairs = pair_local(dev_data, "images/train/", "annotations/train/")
    assert len(pairs) == 5 and all(a.is_file() and b.is_file() for a, b in pairs)


def test_local_pairing_in_one_folder(tmp_path):
    _touch(tmp_path, "d/a.tif", "d/a_mask.tif")
    assert pair_local(tmp_path, "d/*.tif", "d/*_mask.tif") == [
        (tmp_path.resolve() / "d/a.tif", tmp_path.resolve() / "d/a_mask.tif")
    ]


def test_local_pairing_reports_unmatched_files(dev_data):
    with pytest.raises(InvalidInput, match="train_images/train_annotations.*nuclei_03.tif"):
        pair_local(dev_data, "images/test/", "annotations/train/")


# ------------------------------------------------------------------ command-line specs


@pytest.mark.parametrize(
    ("spec", "folder", "rest"),
    [
        ("/data/exp1/images/", Path("/data/exp1/images"), "./"),
        ("/data/exp1/masks/*_mask.tif", Path("/data/exp1/masks"), "*_mask.tif"),
        ("masks/*.png", Path("masks"), "*.png"),
        ("*.png", Path("."), "*.png"),
        ("/*.tif", Path("/"), "*.tif"),
    ],
)
def test_split_local_spec(spec, folder, rest):
    assert split_local_spec(spec) == (folder, rest)


def test_split_local_spec_hints_at_the_missing_slash(tmp_path):
    with pytest.raises(InvalidInput, match="--train-images.*end a folder with '/'"):
        split_local_spec(str(tmp_path), "--train-images")


def test_split_local_spec_explains_the_two_forms(tmp_path):
    with pytest.raises(InvalidInput, match="--train-images.*ending in '/'.*'\\*'"):
        split_local_spec(str(tmp_path / "a.tif"), "--train-images")


@pytest.mark.parametrize("spec", ["data/*/a.tif", "data/*_*.tif"])
def test_split_local_spec_needs_one_star_in_the_file_name(spec):
    with pytest.raises(InvalidInput, match="exactly one"):
        split_local_spec(spec, "--train-images")


def test_cli_specs_as_absolute_folders(dev_data):
    pairs = pair_local_specs(f"{dev_data}/images/train/", f"{dev_data}/annotations/train/")
    assert len(pairs) == 5 and pairs[0][0].name == "bacteria_t15.tif"


def test_cli_specs_as_relative_patterns(dev_data, monkeypatch):
    monkeypatch.chdir(dev_data)
    pairs = pair_local_specs("images/pattern/*.ome.tif", "annotations/pattern/*_mask.ome.tif")
    assert [a.name for _, a in pairs][-1] == "t0004_mask.ome.tif"


def test_cli_specs_with_masks_inside_the_image_folder(tmp_path):
    _touch(tmp_path, "imgs/a.tif", "imgs/masks/a.tif")
    pairs = pair_local_specs(f"{tmp_path}/imgs/", f"{tmp_path}/imgs/masks/")
    assert [(a.parent.name, b.parent.name) for a, b in pairs] == [("imgs", "masks")]


def test_cli_specs_follow_links_to_files_elsewhere(tmp_path):
    # git-annex / DataLad datasets are folders of links into an object store.
    _touch(tmp_path, "store/1", "store/2")
    for side, target in (("imgs", "1"), ("masks", "2")):
        (tmp_path / "ds" / side).mkdir(parents=True)
        (tmp_path / "ds" / side / "a.tif").symlink_to(tmp_path / "store" / target)
    assert len(pair_local_specs(f"{tmp_path}/ds/imgs/", f"{tmp_path}/ds/masks/")) == 1


def test_cli_folder_without_slash_is_explained(dev_data):
    with pytest.raises(InvalidInput, match="--train-images.*end a folder with '/'"):
        pair_local_specs(f"{dev_data}/images/train", f"{dev_data}/annotations/train/")


def test_cli_missing_folder_names_the_option(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(InvalidInput, match="--train-annotations.*does not exist"):
        pair_local_specs(f"{tmp_path}/imgs/", f"{tmp_path}/nowhere/")


def test_cli_pairing_errors_name_the_options(tmp_path):
    _touch(tmp_path, "imgs/a.tif", "masks/b.tif")
    with pytest.raises(InvalidInput, match="--train-images/--train-annotations"):
        pair_local_specs(f"{tmp_path}/imgs/", f"{tmp_path}/masks/")


def test_cellpose_dir_specs_pair_gui_files_and_masks_beside_their_images(tmp_path):
    from cellpose_finetuning.data.local import cellpose_dir_specs, pair_local_specs

    for name in ("a.1.tif", "b.tif", "a.1_seg.npy", "b_seg.npy", "a.1_masks.png", "b_masks.png"):
        (tmp_path / name).write_bytes(b"x")
    images, masks = cellpose_dir_specs(tmp_path, "_seg.npy")
    assert (images, masks) == (f"{tmp_path.as_posix()}/*.tif", f"{tmp_path.as_posix()}/*_seg.npy")
    pairs = pair_local_specs(images, masks)
    assert [(i.name, m.name) for i, m in pairs] == [
        ("a.1.tif", "a.1_seg.npy"),
        ("b.tif", "b_seg.npy"),
    ]
    assert cellpose_dir_specs(tmp_path)[1] == f"{tmp_path.as_posix()}/*_masks.png"
    with pytest.raises(InvalidInput, match="no annotation files ending in '_cp_masks'"):
        cellpose_dir_specs(tmp_path, "_cp_masks")
    (tmp_path / "b_masks.tif").write_bytes(b"x")
    with pytest.raises(InvalidInput, match=r"several file types \(\.png, \.tif\)"):
        cellpose_dir_specs(tmp_path)
