"""Reading images and masks: formats, axes, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.images import (
    CHANNEL_AXIS_RULE,
    infer_axes,
    is_image_file,
    read_image,
    to_canonical,
    write_image,
)
from cellpose_finetuning.io.masks import read_mask, validate_mask, write_mask
from tests.helpers import forge_tiff_size

RNG = np.random.default_rng(0)


def _labels(shape: tuple[int, ...] = (16, 16)) -> np.ndarray:
    """Two square objects, labels 7 and 200, on background."""
    labels = np.zeros(shape, "uint8")
    labels[..., 2:6, 2:6] = 7
    labels[..., 8:12, 8:12] = 200
    return labels


def _assert_same_objects(a: np.ndarray, b: np.ndarray) -> None:
    """Same partition into objects, whatever the ids."""
    pairs = {(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel(), strict=True)}
    assert len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})
    assert (0, 0) in pairs or 0 not in a


# ------------------------------------------------------------------ dev data


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("images/train/nuclei_00.tif", (1, 256, 256)),
        ("images/train/bacteria_t15.tif", (1, 288, 320)),
        ("images/test/bacteria_t19.tif", (1, 288, 320)),
        ("images/pattern/t0000.ome.tif", (1, 256, 256)),
        ("images/3d/nuclei3d.tif", (31, 1, 61, 57)),
    ],
)
def test_dev_images_read_in_canonical_axes(dev_data, name, shape):
    assert read_image(dev_data / name).shape == shape


@pytest.mark.parametrize(
    ("image", "mask", "n_objects"),
    [
        ("images/train/nuclei_00.tif", "annotations/train/nuclei_00.tif", 35),
        ("images/train/bacteria_t15.tif", "annotations/train/bacteria_t15.tif", 9),
        ("images/pattern/t0004.ome.tif", "annotations/pattern/t0004_mask.ome.tif", 16),
        ("images/3d/nuclei3d.tif", "annotations/3d/nuclei3d.tif", 51),
    ],
)
def test_dev_masks_fit_their_images(dev_data, image, mask, n_objects):
    img = read_image(dev_data / image)
    expected = (img.shape[0], *img.shape[2:]) if img.ndim == 4 else img.shape[1:]
    labels = read_mask(dev_data / mask, expected_shape=expected)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(np.unique(labels), np.arange(n_objects + 1))


# ------------------------------------------------------------------ axis rule


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((5, 6), "YX"),
        ((40, 50, 3), "YXC"),
        ((40, 50, 4), "YXC"),
        ((2, 40, 50), "CYX"),
        ((3, 3, 3), "CYX"),
        ((31, 61, 57), "ZYX"),
        ((7, 2, 30, 30), "ZCYX"),
        ((7, 30, 30, 3), "ZYXC"),
    ],
)
def test_axis_rule(shape, axes):
    assert infer_axes(shape) == axes


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5, 6), (7, 30, 30, 30)])
def test_axis_rule_refuses_shapes_it_cannot_read(shape):
    with pytest.raises(ValueError, match="dimensions|channel axis"):
        infer_axes(shape)


def test_axis_rule_text_is_published():
    assert "(Z, C, H, W)" in CHANNEL_AXIS_RULE


def test_explicit_axes_override_the_rule():
    assert to_canonical(np.zeros((3, 20, 30)), "ZYX").shape == (3, 1, 20, 30)


def test_singleton_time_axis_is_dropped():
    assert to_canonical(np.zeros((1, 2, 20, 30)), "TCYX").shape == (2, 20, 30)


def test_several_time_points_are_refused_naming_the_argument():
    with pytest.raises(InvalidInput, match=r"input_arrays\[0\].*'T' has 4 entries"):
        to_canonical(np.zeros((4, 20, 30)), "TYX")


def test_samples_axis_counts_as_channels():
    data = RNG.random((20, 30, 3))
    np.testing.assert_array_equal(to_canonical(data, "YXS"), np.moveaxis(data, -1, 0))


def test_canonical_arrays_are_contiguous():
    assert to_canonical(np.zeros((20, 30, 3))).flags.c_contiguous


@pytest.mark.parametrize(
    ("array", "axes", "message"),
    [
        (np.zeros(5), None, "dimensions"),
        (np.zeros((2, 3, 4, 5, 6)), None, "dimensions"),
        (np.zeros((4, 4), bool), None, "pixel type"),
        (np.zeros((4, 4), complex), None, "pixel type"),
        (np.zeros((0, 4)), None, "empty"),
        (np.zeros((4, 4)), "ZYX", "do not match"),
        (np.zeros((4, 4)), "YY", "twice"),
        (np.zeros((4, 4, 4)), "ZCY", "Y and X"),
    ],
)
def test_bad_arrays_name_the_argument(array, axes, message):
    with pytest.raises(InvalidInput, match=f"input_arrays\\[0\\].*{message}"):
        to_canonical(array, axes, name="input_arrays[0]")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/t0000.ome.tif", True),
        ("X.OME.TIFF", True),
        ("a.tif", True),
        ("a.png", True),
        ("a.JPEG", True),
        ("a.npy", True),
        ("a.geojson", False),
        ("a.tif.json", False),
        ("tif", False),
    ],
)
def test_image_file_names(name, expected):
    assert is_image_file(name) is expected


# ------------------------------------------------------------------ image formats


def test_ome_channel_axis_is_honoured_where_the_rule_would_guess_z(tmp_path):
    data = RNG.integers(0, 255, (5, 20, 30), dtype="uint8")
    tifffile.imwrite(tmp_path / "a.ome.tif", data, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "a.ome.tif"), data)


def test_ome_z_axis_is_honoured_where_the_rule_would_guess_channels(tmp_path):
    data = RNG.integers(0, 255, (3, 20, 30), dtype="uint16")
    tifffile.imwrite(tmp_path / "a.ome.tif", data, metadata={"axes": "ZYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "a.ome.tif"), data[:, None])


def test_ome_channels_last_become_channels_first(tmp_path):
    data = RNG.integers(0, 255, (3, 20, 30), dtype="uint8")
    tifffile.imwrite(tmp_path / "a.ome.tif", np.moveaxis(data, 0, -1), metadata={"axes": "YXC"})
    np.testing.assert_array_equal(read_image(tmp_path / "a.ome.tif"), data)


def test_imagej_hyperstack_reads_as_zcyx(tmp_path):
    data = RNG.integers(0, 255, (4, 2, 20, 30), dtype="uint16")
    tifffile.imwrite(tmp_path / "a.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), data)


def test_time_series_tiff_is_refused_naming_the_file(tmp_path):
    data = np.zeros((3, 2, 20, 30), "uint16")
    tifffile.imwrite(tmp_path / "movie.tif", data, imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(InvalidInput, match="movie.tif.*'T' has 3 entries"):
        read_image(tmp_path / "movie.tif")


def test_tiff_without_axis_metadata_follows_the_rule(tmp_path):
    data = RNG.integers(0, 255, (6, 20, 30), dtype="uint8")
    tifffile.imwrite(tmp_path / "stack.tif", data, metadata=None)
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif"), data[:, None])


def test_rgb_png_becomes_channels_first(tmp_path):
    rgb = np.zeros((10, 12, 3), "uint8")
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.shape == (3, 10, 12) and img[1].max() == 200 and img[0].max() == 0


def test_rgba_png_drops_alpha(tmp_path):
    Image.fromarray(np.full((10, 12, 4), 9, "uint8")).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (3, 10, 12)


def test_grey_png_has_one_channel(tmp_path):
    Image.fromarray(np.full((10, 12), 9, "uint8")).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (1, 10, 12)


def test_16_bit_png_keeps_its_values(tmp_path):
    data = np.array([[0, 1000], [40000, 65535]], "uint16")
    Image.fromarray(data).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), data[None])


def test_jpeg_reads_as_rgb(tmp_path):
    Image.fromarray(RNG.integers(0, 255, (10, 12, 3), dtype="uint8")).save(tmp_path / "a.jpg")
    assert read_image(tmp_path / "a.jpg").shape == (3, 10, 12)


@pytest.mark.parametrize(
    ("shape", "canonical"),
    [
        ((40, 50), (1, 40, 50)),
        ((40, 50, 3), (3, 40, 50)),
        ((2, 40, 50), (2, 40, 50)),
        ((6, 2, 30, 30), (6, 2, 30, 30)),
        ((6, 30, 30, 2), (6, 2, 30, 30)),
    ],
)
def test_npy_follows_the_rule(tmp_path, shape, canonical):
    np.save(tmp_path / "a.npy", np.zeros(shape, "float32"))
    assert read_image(tmp_path / "a.npy").shape == canonical


@pytest.mark.parametrize("name", ["a.tif", "a.ome.tif"])
def test_written_images_read_back_unchanged(tmp_path, name):
    data = RNG.random((3, 2, 20, 30), dtype="float32")  # a 3-slice stack, not 3 channels
    np.testing.assert_array_equal(read_image(write_image(tmp_path / name, data)), data)


def test_write_image_refuses_other_formats(tmp_path):
    with pytest.raises(InvalidInput, match="a.png.*TIFF"):
        write_image(tmp_path / "a.png", np.zeros((1, 4, 4)))


# ------------------------------------------------------------------ mask formats


def test_palette_png_mask_keeps_indices(tmp_path):
    im = Image.fromarray(_labels(), mode="P")
    # Colours that would collapse both objects into one if the palette were applied.
    im.putpalette([255, 0, 0] * 256)
    im.save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    _assert_same_objects(mask, _labels())
    assert mask.max() == 2


def test_colab_rgb_label_format_decodes_ids_above_255(tmp_path):
    rgb = np.zeros((10, 10, 3), "uint8")
    rgb[:5, :5] = (1, 44, 0)  # id 300
    rgb[5:, 5:] = (2, 44, 0)  # id 556: same green, another object
    rgb[:5, 5:] = (0, 44, 0)  # id 44
    Image.fromarray(rgb).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    _assert_same_objects(mask, rgb[..., 0].astype(int) * 256 + rgb[..., 1])
    assert mask.max() == 3


def test_colab_rgba_label_format_ignores_alpha(tmp_path):
    rgba = np.zeros((10, 10, 4), "uint8")
    rgba[..., 3] = 255
    rgba[:5, :5, :3] = (1, 2, 0)
    Image.fromarray(rgba).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").max() == 1


def test_grey_rgb_mask_uses_its_one_channel(tmp_path):
    Image.fromarray(np.repeat(_labels()[..., None], 3, axis=-1)).save(tmp_path / "m.png")
    _assert_same_objects(read_mask(tmp_path / "m.png"), _labels())


def test_colour_picture_as_mask_is_refused_explaining_the_formats(tmp_path):
    rgb = RNG.integers(1, 255, (10, 10, 3), dtype="uint8")
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    with pytest.raises(InvalidInput, match="photo.png.*palette.*Colab"):
        read_mask(tmp_path / "photo.png")


def test_16_bit_png_mask_keeps_objects(tmp_path):
    labels = _labels().astype("uint16") * 300
    Image.fromarray(labels).save(tmp_path / "m.png")
    _assert_same_objects(read_mask(tmp_path / "m.png"), labels)


def test_3d_mask_reads_as_zyx(tmp_path):
    labels = _labels((5, 16, 16))
    tifffile.imwrite(tmp_path / "m.tif", labels, imagej=True, metadata={"axes": "ZYX"})
    assert read_mask(tmp_path / "m.tif", expected_shape=(5, 16, 16)).shape == (5, 16, 16)


@pytest.mark.parametrize("shape", [(1, 16, 16), (16, 16, 1)])
def test_singleton_channel_of_a_mask_is_dropped(tmp_path, shape):
    np.save(tmp_path / "m.npy", _labels().reshape(shape))
    assert read_mask(tmp_path / "m.npy", expected_shape=(16, 16)).shape == (16, 16)


def test_mask_with_several_channels_is_refused(tmp_path):
    tifffile.imwrite(
        tmp_path / "m.ome.tif", np.zeros((2, 16, 16), "uint8"), metadata={"axes": "CYX"}
    )
    with pytest.raises(InvalidInput, match="m.ome.tif.*2 channels"):
        read_mask(tmp_path / "m.ome.tif")


def test_integral_float_mask_file_is_accepted(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", _labels().astype("float32"))
    _assert_same_objects(read_mask(tmp_path / "m.tif"), _labels())


def test_non_integer_float_mask_file_is_refused_naming_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.array([[0.0, 0.5], [1.0, 2.0]], "float32"))
    with pytest.raises(InvalidInput) as err:
        read_mask(tmp_path / "m.tif")
    assert err.value.what == str(tmp_path / "m.tif")
    assert err.value.reason == (
        "mask has non-integer values (e.g. 0.5); masks must be integer instance labels"
    )


# ------------------------------------------------------------------ mask checks


def test_non_sequential_labels_are_renumbered_keeping_objects():
    labels = np.array([[0, 5, 5], [900, 900, 0], [0, 70000, 3]])
    mask = validate_mask(labels, "m")
    np.testing.assert_array_equal(np.unique(mask), [0, 1, 2, 3, 4])
    _assert_same_objects(mask, labels)
    assert mask.dtype == np.uint16


def test_background_stays_zero():
    assert validate_mask(np.array([[0, 9], [9, 0]]), "m")[0, 0] == 0


def test_integral_float_mask_is_accepted():
    assert validate_mask(np.array([[0.0, 2.0]]), "m").dtype == np.uint16


def test_many_labels_use_uint32():
    assert validate_mask(np.arange(70_000).reshape(100, 700), "m").dtype == np.uint32


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.array([[0.0, 0.5]]), r"non-integer values \(e.g. 0.5\)"),
        (np.array([[0, -1]]), "negative"),
        (np.array([[True, False]]), "boolean.*instance labels"),
        (np.array([[np.nan, 1.0]]), "NaN"),
        (np.zeros((0, 3)), "empty"),
        (np.zeros(5, "uint8"), "dimensions"),
        (np.zeros((2, 2, 2, 2), "uint8"), "dimensions"),
        (np.array([["a"]]), "type"),
    ],
)
def test_bad_masks_are_refused_naming_the_file(mask, message):
    with pytest.raises(InvalidInput, match=f"masks/x.tif.*{message}"):
        validate_mask(mask, "masks/x.tif")


def test_boolean_mask_file_is_refused(tmp_path):
    Image.fromarray(np.eye(8, dtype=bool)).save(tmp_path / "semantic.png")
    with pytest.raises(InvalidInput, match="semantic.png.*boolean"):
        read_mask(tmp_path / "semantic.png")


def test_mask_of_another_size_names_both_shapes(dev_data):
    with pytest.raises(InvalidInput, match=r"nuclei_00.tif.*\(256, 256\).*\(100, 100\)"):
        read_mask(dev_data / "annotations/train/nuclei_00.tif", expected_shape=(100, 100))


def test_written_masks_keep_their_labels(tmp_path):
    labels = _labels().astype("int64")
    np.testing.assert_array_equal(tifffile.imread(write_mask(tmp_path / "m.tif", labels)), labels)


def test_written_masks_with_many_labels_are_uint32(tmp_path):
    mask = np.arange(1, 70_001, dtype="uint32").reshape(100, 700)
    assert tifffile.imread(write_mask(tmp_path / "m.tif", mask)).dtype == np.uint32
    assert read_mask(tmp_path / "m.tif").dtype == np.uint32


def test_write_mask_refuses_negative_labels(tmp_path):
    with pytest.raises(InvalidInput, match="m.tif.*negative"):
        write_mask(tmp_path / "m.tif", np.array([[0, -2]]))


# ------------------------------------------------------------------ broken files


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.tif", b"", "empty"),
        ("broken.tif", None, "does not exist"),
        ("broken.tif", b"II*\x00garbage-not-a-tiff", "cannot read"),
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "cannot read"),
        ("broken.jpg", b"\xff\xd8\xff\xe0 not really", "cannot read"),
        ("broken.npy", b"\x93NUMPY\x09\x09garbage", "cannot read"),
        ("broken.gif", b"GIF89a", "unsupported file type"),
    ],
)
def test_broken_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidInput, match=f"{name}.*{message}"):
        read_image(path)


def test_broken_mask_file_is_named(tmp_path):
    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InvalidInput, match="m.png.*cannot read"):
        read_mask(tmp_path / "m.png")


def test_folder_is_not_an_image(tmp_path):
    (tmp_path / "dir.tif").mkdir()
    with pytest.raises(InvalidInput, match="dir.tif.*not a file"):
        read_image(tmp_path / "dir.tif")


def test_truncated_tiff_is_named(tmp_path, dev_data):
    data = (dev_data / "images/train/nuclei_00.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(InvalidInput, match="cut.tif.*cannot read"):
        read_image(tmp_path / "cut.tif")


def test_truncated_png_is_named(tmp_path):
    Image.fromarray(RNG.integers(0, 255, (200, 300), dtype="uint8")).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInput, match="cut.png.*truncated"):
        read_image(tmp_path / "cut.png")


def test_huge_declared_tiff_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((10, 10), "uint8"), metadata=None)
    forge_tiff_size(path, 60_000, 60_000)  # 3.6e9 pixels declared in a 300-byte file

    def no_reading(*args, **kwargs):
        raise AssertionError("pixel data was read")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_reading)
    with pytest.raises(InvalidInput, match=r"huge.tif.*\(60000, 60000\).*limit of 2,147,483,648"):
        read_image(path)


def test_pixel_limit_is_a_parameter(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((100, 100), "uint8"))
    with pytest.raises(InvalidInput, match="a.tif.*limit of 1,000"):
        read_image(tmp_path / "a.tif", max_pixels=1000)


@pytest.mark.parametrize("name", ["a.png", "a.npy"])
def test_pixel_limit_applies_to_every_format(tmp_path, name):
    data = np.zeros((100, 100), "uint8")
    if name.endswith(".npy"):
        np.save(tmp_path / name, data)
    else:
        Image.fromarray(data).save(tmp_path / name)
    with pytest.raises(InvalidInput, match=f"{name}.*limit"):
        read_mask(tmp_path / name, max_pixels=1000)
