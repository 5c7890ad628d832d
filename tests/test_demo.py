"""The demo learns, and a run's baseline is what `evaluate` says of its starting weights."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cellpose_finetuning.cli import main
from cellpose_finetuning.engine.sessions import Session


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_demo_beats_the_untrained_network_by_at_least_0_2_ap(demo_run):
    workdir, out = demo_run
    report = json.loads((workdir / "evaluation" / "evaluation.json").read_text())
    base, tuned = report["models"]
    assert base["model"] == "tiny" and tuned["model"] == "session"
    assert tuned["metrics"]["ap_0_5"] - base["metrics"]["ap_0_5"] >= 0.2, report
    status = Session(workdir / "session").read_status()
    assert status.status_type == "completed"
    # The run's own before/after agrees with the evaluation on the same images.
    assert status.base_instance_metrics.model_dump() == base["metrics"]
    assert status.instance_metrics.model_dump() == tuned["metrics"]
    assert out.strip().splitlines()[-1].startswith("Demo: AP@0.5 ")
    for picture in ("per_image_ap.png", "overlays.png"):
        assert (workdir / "evaluation" / picture).read_bytes().startswith(b"\x89PNG")
    assert (workdir / "session" / "training_curves.png").is_file()


def test_base_instance_metrics_equal_evaluate_of_the_starting_weights(demo_run, dev_data, tmp_path):
    """Start a new run from the demo's trained weights: its baseline is evaluate's row."""
    workdir, _ = demo_run
    test = (f"{dev_data}/images/test/nuclei_*.tif", f"{dev_data}/annotations/test/nuclei_*.tif")
    code, out = _run(
        "evaluate",
        "--model",
        str(workdir / "session"),
        "--images",
        test[0],
        "--annotations",
        test[1],
        "--out",
        str(tmp_path / "eval"),
        "--json",
    )
    assert code == 0, out
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    evaluated = report["models"][0]["metrics"]
    assert evaluated["n_pred"] > 0 and evaluated["ap_0_5"] > 0  # a non-trivial baseline
    code, out = _run(
        "train",
        "--train-images",
        f"{dev_data}/images/train/nuclei_*.tif",
        "--train-annotations",
        f"{dev_data}/annotations/train/nuclei_*.tif",
        "--test-images",
        test[0],
        "--test-annotations",
        test[1],
        "--model",
        str(workdir / "session"),
        "--n-epochs",
        "1",
        "--nimg-per-epoch",
        "1",
        "--learning-rate",
        "1e-4",
        "--out",
        str(tmp_path / "again"),
    )
    assert code == 0, out
    status = Session(tmp_path / "again").read_status()
    assert status.base_instance_metrics.model_dump() == evaluated
    assert out.strip().splitlines()[-1].startswith("Fine-tuning on the test set: AP@0.5 ")


def test_evaluate_names_a_missing_model(dev_data, tmp_path):
    code, out = _run(
        "evaluate",
        "--model",
        str(tmp_path / "nope.pth"),
        "--images",
        f"{dev_data}/images/test/",
        "--annotations",
        f"{dev_data}/annotations/test/",
        "--out",
        str(tmp_path / "e"),
    )
    assert code == 2 and "nope.pth" in out
