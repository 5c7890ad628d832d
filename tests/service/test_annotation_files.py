"""The tools' annotation files on the running service: read_annotation, convert_masks, training."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tifffile

from cellpose_finetuning.client import upload_folder
from tests.helpers import follow_status

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def carol(running_stack):
    server = await running_stack.connect("carol")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


class _RunsACommand:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_seg(marker) -> bytes:
    payload = np.empty((), dtype=object)
    payload[()] = {"masks": np.zeros((256, 256), "uint16"), "x": _RunsACommand(str(marker))}
    buf = io.BytesIO()
    np.save(buf, payload, allow_pickle=True)
    return buf.getvalue()


async def test_read_annotation_reads_each_format_as_training_does(carol, formats_data, dev_data):
    _, svc = carol
    truth = tifffile.imread(dev_data / "annotations/test/nuclei_03.tif")
    for rel in ("seg/test/nuclei_03_seg.npy", "png/test/nuclei_03_cp_masks.png"):
        got = await svc.read_annotation(
            file_name=rel.rpartition("/")[2], data=(formats_data / rel).read_bytes()
        )
        assert got["n_objects"] == truth.max()
        np.testing.assert_array_equal(got["labels"] > 0, truth > 0)
    got = await svc.read_annotation(
        file_name="nuclei_03.geojson",
        data=(formats_data / "geojson/test/nuclei_03.geojson").read_bytes(),
        image_shape=[256, 256],
    )
    assert got["n_objects"] == truth.max()


async def test_read_annotation_refuses_bad_files_naming_them(carol, tmp_path):
    _, svc = carol
    marker = tmp_path / "pwned"
    with pytest.raises(Exception, match=r"evil_seg\.npy: unsafe or corrupt _seg\.npy"):
        await svc.read_annotation(file_name="evil_seg.npy", data=_evil_seg(marker))
    assert not marker.exists()
    outside = {"type": "Polygon", "coordinates": [[[0, 0], [900, 0], [900, 9], [0, 0]]]}
    with pytest.raises(Exception, match=r"far\.geojson: object 1 has coordinates outside"):
        await svc.read_annotation(
            file_name="far.geojson", data=json.dumps(outside).encode(), image_shape=[256, 256]
        )


async def test_convert_masks_gives_every_tool_its_file(carol, dev_data):
    _, svc = carol
    masks = tifffile.imread(dev_data / "annotations/test/nuclei_03.tif")
    files = await svc.convert_masks(masks=masks, image_name="nuclei.03.tif")
    assert sorted(files) == sorted(
        f"nuclei.03{end}"
        for end in ("_masks.tif", "_seg.npy", "_cp_masks.png", "_rois.zip", ".geojson")
    )
    seg = np.load(io.BytesIO(files["nuclei.03_seg.npy"]), allow_pickle=True).item()
    np.testing.assert_array_equal(seg["masks"], masks)
    only = await svc.convert_masks(masks=masks, image_name="x.png", formats=["rois"])
    assert list(only) == ["x_rois.zip"]


async def test_training_on_a_crafted_seg_file_fails_naming_it_and_runs_nothing(
    carol, dev_data, tmp_path
):
    server, svc = carol
    marker = tmp_path / "pwned-by-training"
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "seg").mkdir()
    (data / "images/nuclei_00.tif").write_bytes(
        (dev_data / "images/train/nuclei_00.tif").read_bytes()
    )
    (data / "seg/nuclei_00_seg.npy").write_bytes(_evil_seg(marker))
    dataset = await upload_folder(server, data, alias="evil-seg")
    started = await svc.start_training(
        artifact=dataset,
        train_images="images/*.tif",
        train_annotations="seg/*_seg.npy",
        model="tiny",
        n_epochs=1,
    )
    status, _ = await follow_status(svc, started["session_id"])
    assert status["status_type"] == "failed"
    assert "nuclei_00_seg.npy" in status["message"] and "refused" in status["message"]
    assert status["train_losses"] == []
    assert not marker.exists()


async def test_client_infer_files_writes_the_tools_files_with_whole_stems(
    carol, dev_data, tmp_path
):
    from cellpose_finetuning.client import infer_files

    _, svc = carol
    image = tmp_path / "nuclei.03.tif"
    image.write_bytes((dev_data / "images/test/nuclei_03.tif").read_bytes())
    [written] = await infer_files(
        svc, [image], tmp_path / "out", save=["tif", "seg", "rois"], model="tiny"
    )
    assert {p.name for p in written.values()} == {
        "nuclei.03_masks.tif",
        "nuclei.03_seg.npy",
        "nuclei.03_rois.zip",
    }
    masks = tifffile.imread(written["tif"])
    seg = np.load(written["seg"], allow_pickle=True).item()
    np.testing.assert_array_equal(seg["masks"], masks)
    # infer_files asked for the network's flows: the GUI file carries them
    dp_prob = seg["flows"][-1]
    assert dp_prob.shape == (3, *masks.shape)
    assert np.abs(dp_prob[:2]).max() > 0.1
