"""The tools' annotation files in the web page: check-and-upload and the segment panel.

A folder of cellpose GUI ``_seg.npy`` files or of 16-bit ``_cp_masks.png`` masks
is checked (by the service's own reader) and uploaded; bad tool files are named
and nothing is sent; the segment panel reads a 16-bit PNG ground truth and offers
the masks in every tool's format.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.web.test_workflow import LOOSE, artifacts_of, expect, log_in

pytestmark = pytest.mark.ui


def _folder(formats_data: Path, tmp_path: Path, kind: str) -> Path:
    root = tmp_path / kind
    shutil.copytree(formats_data / "images" / "train", root / "images" / "train")
    shutil.copytree(formats_data / kind / "train", root / kind / "train")
    return root


def _upload(page, folder: Path, masks_spec: str, alias: str) -> None:
    page.set_input_files("#folder-input", str(folder))
    page.fill("#spec-train-images", "images/train/*.tif")
    page.fill("#spec-train-annotations", masks_spec)
    for field in ("#spec-test-images", "#spec-test-annotations"):
        page.fill(field, "")
    page.fill("#dataset-alias", alias)
    page.click("#upload-btn")


def test_check_and_upload_takes_gui_seg_files_and_16_bit_pngs(
    served, page, formats_data, tmp_path
) -> None:
    ex = expect()
    log_in(page, served.page_url, served.token_for("dave"))
    seg = _folder(formats_data, tmp_path, "seg")
    page.set_input_files("#folder-input", str(seg))
    for field in ("#spec-test-images", "#spec-test-annotations"):
        page.fill(field, "")
    # the folder form cannot pair them, and says which pattern will
    page.fill("#spec-train-annotations", "seg/train/")
    ex(page.locator("#pairing-msg.error")).to_contain_text(
        "pair by pattern: give 'images/train/*.tif' and 'seg/train/*_seg.npy'"
    )
    _upload(page, seg, "seg/train/*_seg.npy", "gui-seg")
    ex(page.locator("#pairing-msg")).to_have_text("5 training pairs, no test pairs (no validation)")
    ex(page.locator("#upload-msg.ok")).to_contain_text(
        "ws-user-dave/gui-seg (10 files)", timeout=60_000
    )
    png = _folder(formats_data, tmp_path, "png")
    _upload(page, png, "png/train/*_cp_masks.png", "cp-png")
    ex(page.locator("#upload-msg.ok")).to_contain_text(
        "ws-user-dave/cp-png (10 files)", timeout=60_000
    )
    ids = {a["id"] for a in artifacts_of(served, "dave")}
    assert {"ws-user-dave/gui-seg", "ws-user-dave/cp-png"} <= ids


def test_bad_tool_files_are_named_and_nothing_is_sent(
    served, page, page_record, formats_data, tmp_path
) -> None:
    ex = expect()
    log_in(page, served.page_url, served.token_for("erin"))
    root = tmp_path / "bad"
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in ("nuclei_00", "nuclei_01", "nuclei_02"):
        shutil.copy(formats_data / "images/train" / f"{stem}.tif", root / "images" / "train")
    np.save(root / "masks/nuclei_00_seg.npy", {"outlines": np.zeros((256, 256), "uint16")})
    outside = {"type": "Polygon", "coordinates": [[[0, 0], [400, 0], [400, 9], [0, 0]]]}
    (root / "masks/nuclei_01_seg.npy").write_bytes(b"\x93NUMPY not really")
    shutil.copy(formats_data / "seg/train/nuclei_02_seg.npy", root / "masks")
    _upload(page, root, "masks/*_seg.npy", "bad-seg")
    box = page.locator("#upload-msg.error")
    ex(box).to_contain_text("2 problems in the masks; nothing was uploaded", timeout=60_000)
    ex(box.locator("li").nth(0)).to_contain_text(
        "masks/nuclei_00_seg.npy: this _seg.npy has no 'masks'"
    )
    ex(box.locator("li").nth(1)).to_contain_text("masks/nuclei_01_seg.npy")
    for stem in ("nuclei_00", "nuclei_01", "nuclei_02"):
        (root / f"masks/{stem}_seg.npy").unlink()
        shutil.copy(formats_data / "geojson/train" / f"{stem}.geojson", root / "masks")
    (root / "masks/nuclei_01.geojson").write_text(json.dumps(outside))
    _upload(page, root, "masks/*.geojson", "bad-geojson")
    ex(box).to_contain_text("1 problem in the masks; nothing was uploaded", timeout=60_000)
    ex(box.locator("li")).to_contain_text(
        "masks/nuclei_01.geojson: object 1 has coordinates outside the 256x256 image"
    )
    assert artifacts_of(served, "erin") == []
    s3 = [u for u in page_record.requests if not u.startswith(served.server_url)]
    assert s3 == [], f"files were sent: {s3}"


def test_segment_panel_reads_a_16_bit_png_truth_and_offers_every_format(
    served, page, formats_data, tmp_path
) -> None:
    from cellpose import io as cp_io
    from roifile import roiread

    ex = expect()
    log_in(page, served.page_url, served.token_for("dave"))
    page.click("[data-tab=segment]")
    image = formats_data / "images/test/nuclei_03.tif"
    truth = cp_io.imread(str(formats_data / "png/test/nuclei_03_cp_masks.png"))
    page.set_input_files("#seg-image", str(image))
    page.set_input_files("#seg-mask", str(formats_data / "png/test/nuclei_03_cp_masks.png"))
    page.select_option("#seg-model-a", "tiny")
    page.fill("#seg-flow", LOOSE["flow"])
    page.fill("#seg-cellprob", LOOSE["cellprob"])
    page.click("#seg-run")
    figures = page.locator("#seg-results figure[data-count]")
    ex(figures).to_have_count(2, timeout=180_000)
    assert int(figures.nth(0).get_attribute("data-count")) == truth.max() == 29
    fig = page.locator("#seg-results figure[data-model='tiny']")
    with page.expect_download() as download:
        fig.locator("a[download]").click()
    tif = tmp_path / download.value.suggested_filename
    download.value.save_as(tif)
    masks = tifffile.imread(tif)
    buttons = fig.locator("button[data-format]")
    ex(buttons).to_have_count(4)
    got = {}
    for fmt in ("seg", "png", "rois", "geojson"):
        with page.expect_download() as download:
            fig.locator(f"button[data-format={fmt}]").click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        got[fmt] = path
    assert {p.name for p in got.values()} == {
        "nuclei_03_seg.npy",
        "nuclei_03_cp_masks.png",
        "nuclei_03_rois.zip",
        "nuclei_03.geojson",
    }
    seg = np.load(io.BytesIO(got["seg"].read_bytes()), allow_pickle=True).item()
    np.testing.assert_array_equal(seg["masks"], masks)
    np.testing.assert_array_equal(cp_io.imread(str(got["png"])), masks)
    n = len(np.unique(masks)) - 1
    assert len(roiread(got["rois"])) == n
    assert len(json.loads(got["geojson"].read_text())["features"]) == n
