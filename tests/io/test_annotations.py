"""The tools' annotation formats: cellpose GUI _seg.npy, label PNGs, QuPath GeoJSON, ImageJ ROIs.

Round trips both ways: labels written by the tool's own library read back by us,
and our files read back by the tool's library.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.io.annotations import (
    OUTPUT_FORMATS,
    labels_to_polygons,
    output_name,
    read_seg_npy,
    write_outputs,
)
from cellpose_finetuning.io.masks import read_mask, validate_mask

SPLITS = {
    "train": ["bacteria_t15", "bacteria_t17", "nuclei_00", "nuclei_01", "nuclei_02"],
    "test": ["bacteria_t19", "nuclei_03"],
}
ALL = [(split, stem) for split, stems in SPLITS.items() for stem in stems]
FORMAT_FILES = {
    "seg": "seg/{split}/{stem}_seg.npy",
    "png": "png/{split}/{stem}_cp_masks.png",
    "geojson": "geojson/{split}/{stem}.geojson",
    "rois": "rois/{split}/{stem}_rois.zip",
}


def _truth(dev_data: Path, split: str, stem: str) -> np.ndarray:
    return tifffile.imread(dev_data / "annotations" / split / f"{stem}.tif")


def _ious(truth: np.ndarray, got: np.ndarray) -> list[float]:
    """Per true object, IoU with the object it overlaps most (0 when none)."""
    out = []
    for label in np.unique(truth)[1:]:
        obj = truth == label
        values, counts = np.unique(got[obj], return_counts=True)
        best = values[np.argmax(counts)]
        if best == 0:
            out.append(0.0)
            continue
        other = got == best
        out.append(float((obj & other).sum() / (obj | other).sum()))
    return out


def _same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """The same partition into objects, whatever the label numbers."""
    return np.array_equal(validate_mask(a, "a"), validate_mask(b, "b")) or (
        len(np.unique(a)) == len(np.unique(b)) and min(_ious(a, b), default=1.0) == 1.0
    )


# ------------------------------------------------------------------ the repo's own assets
@pytest.mark.parametrize("fmt", FORMAT_FILES)
def test_dev_annotations_in_every_format_read_as_the_tiff_masks(dev_data, formats_data, fmt):
    for split, stem in ALL:
        truth = _truth(dev_data, split, stem)
        path = formats_data / FORMAT_FILES[fmt].format(split=split, stem=stem)
        got = read_mask(path, expected_shape=truth.shape)
        assert got.max() == len(np.unique(truth)) - 1, path.name
        if fmt in ("seg", "png"):
            assert _same_objects(got, truth), path.name
        else:
            assert min(_ious(truth, got)) >= 0.95, path.name


# ------------------------------------------------------------------ tool's library -> us
def test_seg_npy_from_cellpose_writer_reads_identical(tmp_path, dev_data):
    from cellpose import io as cp_io

    truth = _truth(dev_data, "train", "nuclei_00")
    h, w = truth.shape
    flows = [np.zeros((h, w, 3), "uint8"), np.zeros((2, h, w), "float32"), np.ones((h, w), "f4")]
    cp_io.masks_flows_to_seg(np.zeros((h, w), "f4"), truth, flows, str(tmp_path / "a.1.tif"))
    np.testing.assert_array_equal(read_mask(tmp_path / "a.1_seg.npy"), validate_mask(truth, "t"))


def test_seg_npy_as_the_gui_saves_it_reads_identical(tmp_path, dev_data):
    """The dictionary cellpose's GUI (_save_sets) writes for a manual annotation."""
    truth = _truth(dev_data, "train", "bacteria_t15").astype("uint16")
    dat = {
        "outlines": truth.copy(),
        "colors": np.random.default_rng(0).integers(0, 255, (truth.max(), 3)),
        "masks": truth,
        "filename": "/data/bacteria_t15.tif",
        "flows": [[], [], [], [], [[]]],
        "ismanual": np.ones(truth.max(), bool),
        "manual_changes": [],
        "model_path": 0,
        "flow_threshold": 0.4,
        "cellprob_threshold": 0.0,
        "normalize_params": {"lowhigh": None, "percentile": [1.0, 99.0], "normalize": True},
        "restore": None,
        "ratio": 1.0,
        "diameter": np.float64(30.0),
    }
    np.save(tmp_path / "b_seg.npy", dat)
    assert read_seg_npy(tmp_path / "b_seg.npy")["normalize_params"]["percentile"] == [1.0, 99.0]
    np.testing.assert_array_equal(read_mask(tmp_path / "b_seg.npy"), validate_mask(truth, "t"))


@pytest.mark.parametrize("top", [200, 40_000])
def test_label_png_8_and_16_bit_from_cellpose_reads_identical(tmp_path, dev_data, top):
    from cellpose import io as cp_io

    truth = _truth(dev_data, "train", "nuclei_01").astype("int64")
    spread = np.where(truth > 0, truth * (top // truth.max()), 0)
    dtype = "uint8" if top < 256 else "uint16"
    cp_io.imsave(str(tmp_path / "a_masks.png"), spread.astype(dtype))
    from PIL import Image

    with Image.open(tmp_path / "a_masks.png") as im:
        assert im.mode == ("L" if dtype == "uint8" else "I;16")
    np.testing.assert_array_equal(read_mask(tmp_path / "a_masks.png"), validate_mask(spread, "t"))


def _qupath_feature(rings: list, kind: str = "detection", geom: str = "Polygon") -> dict:
    coords = rings if geom == "Polygon" else [rings]
    return {
        "type": "Feature",
        "id": "0d2bb1b0-3c2b-4b4e-9a47-1f0c8f1e2a3b",
        "geometry": {"type": geom, "coordinates": coords},
        "properties": {
            "objectType": kind,
            "classification": {"name": "Nucleus", "color": [1, 2, 3]},
        },
    }


def test_geojson_as_qupath_exports_it_reads_objects_holes_and_skips_the_region(tmp_path):
    square = [[2, 2], [10, 2], [10, 10], [2, 10], [2, 2]]
    hole = [[4, 4], [6, 4], [6, 6], [4, 6], [4, 4]]
    other = [[12, 1], [15, 1], [15, 3], [12, 3], [12, 1]]
    region = [[0, 0], [20, 0], [20, 16], [0, 16], [0, 0]]
    collection = {
        "type": "FeatureCollection",
        "features": [
            _qupath_feature([region], kind="annotation"),
            _qupath_feature([square, hole]),
            _qupath_feature([other], geom="MultiPolygon"),
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}},
        ],
    }
    (tmp_path / "a.geojson").write_text(json.dumps(collection, indent=2))
    labels = read_mask(tmp_path / "a.geojson", expected_shape=(16, 20))
    expected = np.zeros((16, 20), "uint16")
    expected[2:10, 2:10] = 1
    expected[4:6, 4:6] = 0
    expected[1:3, 12:15] = 2
    np.testing.assert_array_equal(labels, validate_mask(expected, "expected"))  # renumbered
    # QuPath before 0.4 writes a bare list of features
    (tmp_path / "b.geojson").write_text(json.dumps(collection["features"][1:3]))
    np.testing.assert_array_equal(read_mask(tmp_path / "b.geojson", (16, 20)), labels)


def test_imagej_rois_written_by_roifile_read_back(tmp_path, dev_data):
    from roifile import ROI_TYPE, ImagejRoi, roiwrite

    truth = _truth(dev_data, "train", "bacteria_t17")
    rois = [
        ImagejRoi.frompoints(polys[0][0][:-1], name=str(label))
        for label, polys in labels_to_polygons(truth)
    ]
    roiwrite(tmp_path / "RoiSet.zip", rois)
    got = read_mask(tmp_path / "RoiSet.zip", expected_shape=truth.shape)
    assert min(_ious(truth, got)) >= 0.95

    # rectangles and ovals drawn in Fiji are areas too; lines are skipped
    rect = ImagejRoi(roitype=ROI_TYPE.RECT, left=1, top=2, right=5, bottom=4, name="r")
    oval = ImagejRoi(roitype=ROI_TYPE.OVAL, left=10, top=10, right=20, bottom=20, name="o")
    line = ImagejRoi(roitype=ROI_TYPE.LINE, x1=0, y1=0, x2=5, y2=5, name="l")
    roiwrite(tmp_path / "shapes.zip", [rect, oval, line])
    got = read_mask(tmp_path / "shapes.zip", expected_shape=(24, 24))
    assert got.max() == 2
    np.testing.assert_array_equal(np.argwhere(got == 1).min(0), [2, 1])
    np.testing.assert_array_equal(np.argwhere(got == 1).max(0), [3, 4])
    assert 60 < (got == 2).sum() < 100  # a circle of diameter 10: ~78 pixels


# ------------------------------------------------------------------ us -> tool's library
def test_our_outputs_read_back_by_the_tools_libraries(tmp_path, dev_data):
    from cellpose import io as cp_io
    from matplotlib.path import Path as MplPath
    from roifile import roiread

    truth = _truth(dev_data, "test", "nuclei_03")
    written = write_outputs(tmp_path, "nuclei.03.tif", truth, list(OUTPUT_FORMATS))
    assert {p.name for p in written.values()} == {
        "nuclei.03_masks.tif",
        "nuclei.03_seg.npy",
        "nuclei.03_cp_masks.png",
        "nuclei.03_rois.zip",
        "nuclei.03.geojson",
    }
    # cellpose: np.load as the GUI does it, and its own imread for the PNG
    dat = np.load(written["seg"], allow_pickle=True).item()
    np.testing.assert_array_equal(dat["masks"], truth)
    assert {"outlines", "flows", "filename", "ismanual"} <= set(dat)
    assert dat["outlines"].shape == truth.shape and dat["outlines"].max() == truth.max()
    np.testing.assert_array_equal(cp_io.imread(str(written["png"])), truth)
    # roifile: one polygon ROI per object, filled by ImageJ's rule (pixel centres inside)
    rois = roiread(written["rois"])
    assert len(rois) == len(np.unique(truth)) - 1
    centres = np.argwhere(np.ones(truth.shape, bool))[:, ::-1] + 0.5
    for roi in rois:
        inside = MplPath(roi.coordinates()).contains_points(centres).reshape(truth.shape)
        label = int(roi.name)
        obj = truth == label
        assert (inside & obj).sum() / (inside | obj).sum() >= 0.95, roi.name
    # GeoJSON: QuPath's FeatureCollection of detections, one per object
    collection = json.loads(written["geojson"].read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == len(np.unique(truth)) - 1
    for feature in collection["features"]:
        assert feature["properties"]["objectType"] == "detection"
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")


def test_output_names_keep_the_whole_stem():
    assert output_name("a.1.tif", "tif") == "a.1_masks.tif"
    assert output_name("a.2.tif", "seg") == "a.2_seg.npy"
    assert output_name("dir/x.png", "png") == "x_cp_masks.png"
    with pytest.raises(InvalidInput, match="unknown format"):
        output_name("a.tif", "jpeg")


def test_3d_masks_only_as_tif(tmp_path):
    stack = np.zeros((5, 8, 8), "uint16")
    stack[1, 2:4, 2:4] = 1
    assert write_outputs(tmp_path, "s.tif", stack, ["tif"])["tif"].exists()
    with pytest.raises(InvalidInput, match="2-D masks"):
        write_outputs(tmp_path, "s.tif", stack, ["seg"])


# ------------------------------------------------------------------ bad files
class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_naming_the_file_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.empty((), dtype=object)
    payload[()] = {"masks": np.zeros((4, 4), "uint16"), "x": _RunsACommand(marker)}
    np.save(tmp_path / "evil_seg.npy", payload, allow_pickle=True)
    with pytest.raises(InvalidInput, match=r"evil_seg\.npy.*refused to load posix\.system"):
        read_mask(tmp_path / "evil_seg.npy")
    assert not marker.exists()
    # numpy's own loader would have run it: the file really is an attack
    np.load(tmp_path / "evil_seg.npy", allow_pickle=True)
    assert marker.exists()


def test_plain_pickle_named_seg_npy_is_refused(tmp_path):
    (tmp_path / "x_seg.npy").write_bytes(pickle.dumps({"masks": np.zeros((2, 2))}))
    with pytest.raises(InvalidInput, match=r"x_seg\.npy"):
        read_mask(tmp_path / "x_seg.npy")


def test_seg_npy_without_masks_names_the_file_and_its_keys(tmp_path):
    np.save(tmp_path / "a_seg.npy", {"outlines": np.zeros((4, 4), "uint16"), "filename": "a"})
    with pytest.raises(InvalidInput, match=r"a_seg\.npy: .*no 'masks' entry \(keys: filename"):
        read_mask(tmp_path / "a_seg.npy")


def test_geojson_without_polygons_names_the_file(tmp_path):
    points = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 4]}},
            {
                "type": "Feature",
                "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
            },
        ],
    }
    (tmp_path / "pts.geojson").write_text(json.dumps(points))
    with pytest.raises(
        InvalidInput, match=r"pts\.geojson: has no polygons .*1 Point, 1 LineString"
    ):
        read_mask(tmp_path / "pts.geojson", expected_shape=(10, 10))
    (tmp_path / "junk.geojson").write_text("{not json")
    with pytest.raises(InvalidInput, match=r"junk\.geojson: cannot read GeoJSON"):
        read_mask(tmp_path / "junk.geojson", expected_shape=(10, 10))


def test_geojson_outside_the_image_names_the_file(tmp_path):
    big = _qupath_feature([[[0, 0], [300, 0], [300, 20], [0, 20], [0, 0]]])
    (tmp_path / "other_image.geojson").write_text(json.dumps(big))
    with pytest.raises(InvalidInput, match=r"other_image\.geojson: object 1 .*outside the 16x20"):
        read_mask(tmp_path / "other_image.geojson", expected_shape=(16, 20))


def test_polygons_need_the_image_size(tmp_path):
    (tmp_path / "a.geojson").write_text(json.dumps(_qupath_feature([[[0, 0], [2, 0], [2, 2]]])))
    with pytest.raises(InvalidInput, match=r"a\.geojson: polygon annotations are rasterised"):
        read_mask(tmp_path / "a.geojson")


def test_roi_zip_with_a_broken_entry_names_the_file_and_the_entry(tmp_path):
    from roifile import ImagejRoi

    good = ImagejRoi.frompoints([[1, 1], [5, 1], [5, 5], [1, 5]], name="good").tobytes()
    with zipfile.ZipFile(tmp_path / "RoiSet.zip", "w") as zf:
        zf.writestr("good.roi", good)
        zf.writestr("0007-0042.roi", b"Iout\x00\xe3garbage")
    with pytest.raises(
        InvalidInput, match=r"RoiSet\.zip: entry '0007-0042\.roi' is not a readable"
    ):
        read_mask(tmp_path / "RoiSet.zip", expected_shape=(10, 10))
    (tmp_path / "notzip.zip").write_bytes(b"PK but not really")
    with pytest.raises(InvalidInput, match=r"notzip\.zip: is not an ImageJ ROI set"):
        read_mask(tmp_path / "notzip.zip", expected_shape=(10, 10))
