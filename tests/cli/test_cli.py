"""The command line, end to end on the dev images with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cellpose_finetuning.cli import main


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained_session(tmp_path_factory, dev_data):
    """init-model, then train 3 epochs with validation every epoch (the acceptance run)."""
    tmp = tmp_path_factory.mktemp("cli")
    code, out = _run("init-model", "--preset", "tiny", "--out", str(tmp / "tiny.pth"))
    assert code == 0, out
    code, out = _run(
        "train",
        "--train-images",
        f"{dev_data}/images/train/",
        "--train-annotations",
        f"{dev_data}/annotations/train/",
        "--test-images",
        f"{dev_data}/images/test/",
        "--test-annotations",
        f"{dev_data}/annotations/test/",
        "--model",
        str(tmp / "tiny.pth"),
        "--n-epochs",
        "3",
        "--validation-interval",
        "1",
        "--learning-rate",
        "1e-3",
        "--out",
        str(tmp / "session"),
    )
    assert code == 0, out
    return tmp / "session"


def test_train_reports_a_completed_status_with_all_histories(trained_session):
    code, out = _run("status", str(trained_session))
    assert code == 0
    status = json.loads(out)
    assert status["status_type"] == "completed"
    assert len(status["train_losses"]) == 3
    assert len(status["test_metrics"]) == 3 and all(status["test_metrics"])
    assert set(status["instance_metrics"]) >= {"ap_0_5", "ap_0_75", "ap_0_9", "n_true", "n_pred"}
    assert status["base_instance_metrics"]["n_true"] == status["instance_metrics"]["n_true"]
    assert (trained_session / "training_curves.png").is_file()


def test_infer_writes_one_mask_per_image_with_its_size(trained_session, dev_data, tmp_path):
    images = sorted((dev_data / "images" / "test").glob("*.tif"))
    code, out = _run(
        "infer",
        "--model",
        str(trained_session),
        *map(str, images),
        "--out",
        str(tmp_path),
        "--json",
    )
    assert code == 0, out
    summary = json.loads(out)
    assert len(summary) == len(images)
    for image, entry in zip(images, summary, strict=True):
        mask = tifffile.imread(entry["masks"])
        assert mask.shape == tifffile.imread(image).shape[-2:]
        assert mask.dtype in (np.uint16, np.uint32)


def test_cellpose_spellings_and_dir_form_reach_the_session(formats_data, tmp_path, monkeypatch):
    """cellpose's own command line (--dir, --mask_filter _seg.npy, --n_epochs...) on GUI
    files laid out as cellpose keeps them; the worker is not started (training with these
    files is tested in tests/engine/test_training.py)."""
    import shutil

    from cellpose_finetuning.engine import training

    for split in ("train", "test"):
        folder = tmp_path / split
        folder.mkdir()
        for image in (formats_data / "images" / split).glob("*.tif"):
            shutil.copy(image, folder / image.name)
            shutil.copy(formats_data / "seg" / split / f"{image.stem}_seg.npy", folder)
    started = []

    class _NotStarted:
        pid = 0

    monkeypatch.setattr(training, "start_worker", lambda s: started.append(s) or _NotStarted())
    code, out = _run(
        "train",
        *("--dir", str(tmp_path / "train"), "--test_dir", str(tmp_path / "test")),
        *("--mask_filter", "_seg.npy", "--pretrained_model", "cpsam", "--n_epochs", "7"),
        *("--learning_rate", "1e-5", "--weight_decay", "0.1", "--min_train_masks", "5"),
        *("--out", str(tmp_path / "session"), "--detach"),
    )
    assert code == 0, out
    settings = started[0].settings
    assert (settings.model, settings.n_epochs, settings.learning_rate) == ("cpsam", 7, 1e-5)
    assert (settings.weight_decay, settings.min_train_masks) == (0.1, 5)
    data = started[0].data
    assert [Path(m).name for _, m in data.train] == [
        f"{s}_seg.npy"
        for s in ("bacteria_t15", "bacteria_t17", "nuclei_00", "nuclei_01", "nuclei_02")
    ]
    assert [Path(m).name for _, m in data.test] == ["bacteria_t19_seg.npy", "nuclei_03_seg.npy"]


def test_infer_saves_every_format_keeping_the_whole_stem(trained_session, dev_data, tmp_path):
    import shutil

    image = dev_data / "images" / "test" / "nuclei_03.tif"
    for name in ("a.1.tif", "a.2.tif"):
        shutil.copy(image, tmp_path / name)
    out = tmp_path / "out"
    code, text = _run(
        "infer",
        "--model",
        str(trained_session),
        str(tmp_path / "a.1.tif"),
        str(tmp_path / "a.2.tif"),
        "--out",
        str(out),
        "--save",
        "all",
        "--json",
    )
    assert code == 0, text
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"a.{i}{end}"
        for i in (1, 2)
        for end in ("_masks.tif", "_seg.npy", "_cp_masks.png", "_rois.zip", ".geojson")
    )
    entry = json.loads(text)[0]
    assert set(entry["files"]) == {"tif", "seg", "png", "rois", "geojson"}
    masks = tifffile.imread(entry["files"]["tif"])
    seg = np.load(entry["files"]["seg"], allow_pickle=True).item()
    np.testing.assert_array_equal(seg["masks"], masks)
    # the network's flows, for the GUI (dP and cell probability), not zeros
    dp_prob = seg["flows"][-1]
    assert dp_prob.shape == (3, *masks.shape)
    assert np.abs(dp_prob[:2]).max() > 0.1
    assert not np.isin(dp_prob[2], [-5.0, 5.0]).all()  # not the +-5 stand-in from masks


def test_status_plot_draws_the_curves(trained_session, tmp_path):
    code, _ = _run("status", str(trained_session), "--plot", str(tmp_path / "c.png"))
    assert code == 0
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_unmatched_pairs_exit_non_zero_naming_the_argument(tmp_path, dev_data):
    code, out = _run(
        "train",
        "--train-images",
        f"{dev_data}/images/train/",
        "--train-annotations",
        f"{dev_data}/annotations/test/",
        "--model",
        "cpsam",
        "--out",
        str(tmp_path / "s"),
    )
    assert code == 2
    assert "Error:" in out and "train" in out and "Traceback" not in out


def test_test_images_without_annotations_are_refused(tmp_path, dev_data, tiny_model):
    code, out = _run(
        "train",
        "--train-images",
        f"{dev_data}/images/train/",
        "--train-annotations",
        f"{dev_data}/annotations/train/",
        "--test-images",
        f"{dev_data}/images/test/",
        "--model",
        str(tiny_model),
        "--out",
        str(tmp_path / "s"),
    )
    assert code == 2 and "--test-annotations" in out


def test_unknown_base_model_is_refused(tmp_path, dev_data):
    code, out = _run(
        "train",
        "--train-images",
        f"{dev_data}/images/train/",
        "--train-annotations",
        f"{dev_data}/annotations/train/",
        "--model",
        str(tmp_path / "missing.pth"),
        "--out",
        str(tmp_path / "s"),
    )
    assert code == 2 and "model" in out


def test_status_of_a_missing_session_is_a_clear_error(tmp_path):
    code, out = _run("status", str(tmp_path / "nope"))
    assert code == 2 and "not found" in out


def test_every_command_has_help_with_an_example():
    for command in ("init-model", "train", "continue", "status", "stop", "infer", "evaluate"):
        code, out = _run(command, "--help")
        assert code == 0 and "Example" in out, command


def test_training_a_stack_is_refused_naming_the_file(tmp_path, dev_data, tiny_model):
    code, out = _run(
        "train",
        "--train-images",
        f"{dev_data}/images/3d/",
        "--train-annotations",
        f"{dev_data}/annotations/3d/",
        "--model",
        str(tiny_model),
        "--out",
        str(tmp_path / "s"),
    )
    # The run starts, then fails reading the stack: exit 1 with the file named.
    assert code == 1 and "nuclei3d.tif" in out
