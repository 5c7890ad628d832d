"""Reading images and masks: formats, axes, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.images import (
    infer_axes,
    read_image,
    read_mask,
    to_canonical,
    validate_mask,
    write_mask,
)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("images/train/nuclei_00.tif", (1, 256, 256)),
        ("images/train/bacteria_t15.tif", (1, 288, 320)),
        ("images/pattern/t0000.ome.tif", (1, 256, 256)),
        ("images/3d/nuclei3d.tif", (31, 1, 61, 57)),
    ],
)
def test_dev_images_read_in_canonical_axes(dev_data, name, shape):
    assert read_image(dev_data / name).shape == shape


def test_dev_masks_are_sequential_labels(dev_data):
    mask = read_mask(dev_data / "annotations/train/nuclei_00.tif", expected_shape=(256, 256))
    ids = np.unique(mask)
    assert mask.dtype == np.uint16 and ids[0] == 0
    np.testing.assert_array_equal(ids, np.arange(len(ids)))


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((5, 6), "YX"),
        ((40, 50, 3), "YXC"),
        ((2, 40, 50), "CYX"),
        ((31, 61, 57), "ZYX"),
        ((7, 2, 30, 30), "ZCYX"),
        ((7, 30, 30, 3), "ZYXC"),
    ],
)
def test_axis_rule(shape, axes):
    assert infer_axes(shape) == axes


def test_ome_axes_are_honoured(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (3, 20, 30), dtype="uint8")
    tifffile.imwrite(tmp_path / "a.ome.tif", np.moveaxis(data, 0, -1), metadata={"axes": "YXC"})
    np.testing.assert_array_equal(read_image(tmp_path / "a.ome.tif"), data)


def test_rgb_png_becomes_channels_first(tmp_path):
    rgb = np.zeros((10, 12, 3), "uint8")
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.shape == (3, 10, 12) and img[1].max() == 200


def test_npy_hwc_and_zchw(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((40, 50, 3), "float32"))
    np.save(tmp_path / "b.npy", np.zeros((6, 2, 30, 30), "float32"))
    assert read_image(tmp_path / "a.npy").shape == (3, 40, 50)
    assert read_image(tmp_path / "b.npy").shape == (6, 2, 30, 30)


def test_palette_png_mask_keeps_indices(tmp_path):
    labels = np.zeros((16, 16), "uint8")
    labels[2:6, 2:6], labels[8:12, 8:12] = 7, 200
    im = Image.fromarray(labels, mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (3 * i) % 256)])
    im.save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert sorted(np.unique(mask)) == [0, 1, 2]
    assert mask[3, 3] != mask[9, 9] and mask[0, 0] == 0


def test_colab_rgb_label_format_decodes_ids_above_255(tmp_path):
    rgb = np.zeros((10, 10, 3), "uint8")
    rgb[:5, :5] = (1, 44, 0)  # id 300
    rgb[5:, 5:] = (0, 3, 0)  # id 3
    Image.fromarray(rgb).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert len(np.unique(mask)) == 3 and mask[0, 0] != mask[9, 9]


def test_colour_picture_as_mask_is_refused(tmp_path):
    rgb = np.random.default_rng(0).integers(1, 255, (10, 10, 3), dtype="uint8")
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    with pytest.raises(InvalidInput, match="photo.png.*Colab"):
        read_mask(tmp_path / "photo.png")


def test_non_sequential_labels_are_renumbered():
    mask = validate_mask(np.array([[0, 5], [900, 5]]), "m")
    np.testing.assert_array_equal(np.unique(mask), [0, 1, 2])


def test_integral_float_mask_is_accepted():
    assert validate_mask(np.array([[0.0, 2.0]]), "m").dtype == np.uint16


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.array([[0.0, 0.5]]), "non-integer"),
        (np.array([[0, -1]]), "negative"),
        (np.array([[True, False]]), "boolean"),
        (np.array([[np.nan, 1.0]]), "NaN"),
        (np.zeros((0, 3)), "empty"),
    ],
)
def test_bad_masks_are_refused_naming_the_file(mask, message):
    with pytest.raises(InvalidInput, match=f"masks/x.tif.*{message}"):
        validate_mask(mask, "masks/x.tif")


def test_mask_of_another_size_names_both_shapes(dev_data):
    with pytest.raises(InvalidInput, match=r"nuclei_00.tif.*\(256, 256\).*\(100, 100\)"):
        read_mask(dev_data / "annotations/train/nuclei_00.tif", expected_shape=(100, 100))


def test_many_labels_use_uint32(tmp_path):
    mask = np.arange(1, 70_001, dtype="uint32").reshape(100, 700)
    write_mask(tmp_path / "m.tif", mask)
    assert read_mask(tmp_path / "m.tif").dtype == np.uint32


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"II*\x00garbage-not-a-tiff", "cannot read"), (None, "does not exist")],
)
def test_broken_files_are_named(tmp_path, content, message):
    path = tmp_path / "broken.tif"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidInput, match=f"broken.tif.*{message}"):
        read_image(path)


def test_truncated_tiff_is_named(tmp_path, dev_data):
    data = (dev_data / "images/train/nuclei_00.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(InvalidInput, match="cut.tif"):
        read_image(tmp_path / "cut.tif")


def test_huge_declared_tiff_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.tif"
    # A 50000x50000 uint8 image declared in the header; the file itself stays sparse.
    with tifffile.TiffWriter(path) as tif:
        tif.write(shape=(50_000, 50_000), dtype="uint8")
    with pytest.raises(InvalidInput, match="huge.tif.*limit"):
        read_image(path, max_pixels=100_000_000)


def test_unsupported_suffix_is_named(tmp_path):
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(InvalidInput, match="a.gif.*unsupported"):
        read_image(tmp_path / "a.gif")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(5), "dimensions"),
        (np.zeros((2, 3, 4, 5, 6)), "dimensions"),
        (np.zeros((4, 4), bool), "pixel type"),
        (np.zeros((4, 4), complex), "pixel type"),
    ],
)
def test_bad_arrays_name_the_argument(array, message):
    with pytest.raises(InvalidInput, match=f"input_arrays\\[0\\].*{message}"):
        to_canonical(array, name="input_arrays[0]")
