"""BioImage.IO export, wrapper form: packages that bioimageio.spec accepts and bioimageio.core runs.

(The standard form, the default, is tested in ``test_bioimageio_standard.py``.)

The session is made by hand (tiny untrained networks, a completed status
with a few losses) instead of by training, to keep the module fast. An
untrained tiny network finds no cells at cellpose's default thresholds, so
the main package is built with thresholds that let it output many (noise)
labels: the reproducibility checks then compare non-trivial label images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cellpose_finetuning.engine.models import ARCH_KEY, PRESETS, build_network, save_network
from cellpose_finetuning.engine.schemas import (
    InferenceSettings,
    InstanceMetrics,
    TrainingSettings,
    ValidationMetrics,
)
from cellpose_finetuning.engine.sessions import DataSpec, Session, SessionStore
from cellpose_finetuning.errors import Conflict
from cellpose_finetuning.export import bioimageio as bx
from cellpose_finetuning.export.bioimageio.metadata import _base_model

DATASET_ID = "bioimage-io/dev-nuclei-bacteria"
NOISY = InferenceSettings(cellprob_threshold=-3.0, flow_threshold=0.0)


def _tiny_weights(path: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    save_network(build_network(PRESETS["tiny"]), PRESETS["tiny"], path)


def _make_session(root: Path, train_pairs, test_pairs, tiny_model: Path) -> Session:
    store = SessionStore(root)
    session = store.create(
        TrainingSettings(model=str(tiny_model), n_epochs=3, learning_rate=1e-4),
        DataSpec(
            train=[(str(i), str(m)) for i, m in train_pairs],
            test=[(str(i), str(m)) for i, m in test_pairs],
            dataset_artifact_id=DATASET_ID,
        ),
    )
    _tiny_weights(session.path / "weights" / "best.pth", seed=0)
    _tiny_weights(session.path / "weights" / "last.pth", seed=1)
    pixel = ValidationMetrics(pixel_accuracy=0.8, precision=0.5, recall=0.4, f1=0.44, iou=0.29)
    session.update_status(
        status_type="completed",
        message="done",
        train_losses=[1.6, 1.3, 1.1],
        test_losses=[1.7, None, 1.2],
        test_metrics=[pixel, None, pixel],
        instance_metrics=InstanceMetrics(ap_0_5=0.1, ap_0_75=0.0, ap_0_9=0.0, n_true=50, n_pred=9),
        current_epoch=3,
        best_epoch=3,
        elapsed_seconds=9.5,
    )
    return session


@pytest.fixture(scope="module")
def session(tmp_path_factory, train_pairs, test_pairs, tiny_model) -> Session:
    root = tmp_path_factory.mktemp("sessions")
    return _make_session(root, train_pairs, test_pairs, tiny_model)


@pytest.fixture(scope="module")
def package(session, tmp_path_factory) -> bx.PackageResult:
    return bx.build_package(
        session, tmp_path_factory.mktemp("export") / "pkg", inference=NOISY, format="wrapper"
    )


@pytest.fixture(scope="module")
def rdf(package) -> dict:
    return yaml.safe_load(package.rdf.read_text())


@pytest.fixture(scope="module")
def core_report(package) -> bx.ModelTestReport:
    return bx.test_package(package.path)


# --------------------------------------------------------------------------- validity
def test_package_holds_the_contract_files(package):
    names = {p.name for p in package.path.iterdir()}
    assert set(bx.CONTRACT_FILES) <= names
    assert {"environment.yaml", "training_curves.png", "sample_input.tif"} <= names


def test_package_validates_without_errors(package):
    assert bx.validate_package(package.path) == []
    assert bx.validate_package(package.rdf) == []


def test_bioimageio_core_model_test_passes(core_report):
    assert core_report.passed, core_report.errors
    names = {t["name"]: t["status"] for t in core_report.tests}
    assert names["Reproduce test outputs from test inputs (pytorch_state_dict)"] == "passed"
    sized = [n for n in names if "size parameter n: 2" in n]
    assert sized and all(names[n] == "passed" for n in sized)


def test_validation_reports_the_specs_messages_for_a_broken_package(package, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(package.path, broken)
    out = np.load(broken / "output_sample.npy")
    np.save(broken / "output_sample.npy", out[:, :, :10])  # no longer the input's size
    errors = bx.validate_package(broken)
    assert errors
    assert any("output_sample" in e or "sha256" in e or "size" in e for e in errors), errors


def test_an_invalid_package_is_refused_with_the_specs_messages(session, tmp_path):
    with pytest.raises(bx.ExportError, match="name") as info:
        bx.build_package(
            session, tmp_path / "pkg", model_name="abc", inference=NOISY, format="wrapper"
        )
    assert info.value.messages


# --------------------------------------------------------------------------- test tensors
def test_input_sample_is_the_first_test_image_with_a_batch_axis(package, test_pairs):
    from cellpose_finetuning.io.images import read_image

    sample = np.load(package.path / "input_sample.npy")
    expected = read_image(test_pairs[0][0]).astype("float32")[None]
    assert sample.dtype == np.float32
    np.testing.assert_array_equal(sample, expected)


def test_output_sample_is_what_the_exported_model_makes_of_the_input(package, test_pairs):
    from cellpose_finetuning.io.images import read_mask

    image = np.load(package.path / "input_sample.npy")
    output = np.load(package.path / "output_sample.npy")
    assert output.shape == (1, 1, *image.shape[-2:])
    assert output.dtype == np.int32
    assert output.max() > 1  # non-trivial labels to reproduce
    np.testing.assert_array_equal(bx.run_exported_model(package.path, image), output)
    truth = read_mask(test_pairs[0][1])
    assert not np.array_equal(output[0, 0], truth)


def test_exported_model_segments_like_the_inference_engine(package, session):
    import torch

    from cellpose_finetuning.engine.inference import segment
    from cellpose_finetuning.engine.models import load_network, wrap_network

    net, _ = load_network(session.weights("best"))
    engine = wrap_network(net.eval(), torch.device("cpu"), "best")
    image = np.load(package.path / "input_sample.npy")[0]
    expected = segment(engine, image, NOISY)
    np.testing.assert_array_equal(np.load(package.path / "output_sample.npy")[0, 0], expected)


def test_weights_are_the_checkpoint_without_its_architecture_entry(package, session):
    import torch

    exported = torch.load(package.path / "model_weights.pth", weights_only=True)
    original = torch.load(session.weights("best"), weights_only=True)
    assert ARCH_KEY not in exported
    assert exported.keys() == {k for k in original if k != ARCH_KEY}
    assert all(torch.equal(exported[k], original[k]) for k in exported)


# --------------------------------------------------------------------------- rdf design
def test_rdf_lineage_names_the_training_dataset_and_base_model(package, rdf):
    assert rdf["training_data"] == {"id": DATASET_ID}
    assert package.training_dataset_id == DATASET_ID
    assert "parent" not in rdf  # no bioimage.io id for the base model
    base = rdf["config"]["cellpose_finetuning"]["base_model"]
    assert base["name"].startswith("checkpoint tiny.pth")
    assert rdf["config"]["cellpose_finetuning"]["training_dataset_id"] == DATASET_ID


def test_rdf_cites_cellpose_and_cellpose_sam(rdf):
    dois = {c["doi"] for c in rdf["cite"]}
    assert {"10.1038/s41592-020-01018-x", "10.1101/2025.04.28.651001"} <= dois


def test_rdf_files_covers_docs_and_dependencies(rdf, package):
    from bioimageio.spec.model.v0_5 import ModelDescr

    assert rdf["format_version"] == ModelDescr.implemented_format_version
    assert rdf["covers"][0]["source"] == "cover.png"
    assert rdf["documentation"]["source"] == "doc.md"
    assert rdf["attachments"][0]["source"] == "training_curves.png"
    weights = rdf["weights"]["pytorch_state_dict"]
    assert weights["architecture"]["callable"] == "CellposeSAMSegmenter"
    assert weights["architecture"]["kwargs"]["embed_dim"] == PRESETS["tiny"].embed_dim
    assert weights["strict"] is True
    assert weights["dependencies"]["source"] == "environment.yaml"
    env = (package.path / "environment.yaml").read_text()
    assert "cellpose==" in env and "numpy<2.4" in env
    doc = (package.path / "doc.md").read_text()
    assert "## Validation" in doc and "training_curves.png" in doc and "AP@0.5" in doc


def test_rdf_license_defaults_to_mit_for_a_network_trained_from_scratch(rdf, package):
    assert rdf["license"] == package.license == "MIT"


def test_cellpose_sam_base_model_is_bsd3_and_has_no_bioimageio_parent():
    base = _base_model("cpsam", PRESETS["cpsam"])
    assert base["license"] == "BSD-3-Clause"
    assert base["bioimageio_id"] is None
    assert "Apache-2.0" in base["notes"]


def test_rdf_axes_accept_any_image_size_and_give_int32_labels(rdf):
    (inp,) = rdf["inputs"]
    (out,) = rdf["outputs"]
    assert [a["type"] for a in inp["axes"]] == ["batch", "channel", "space", "space"]
    assert inp["axes"][2]["size"] == {"min": bx.MIN_SPATIAL_SIZE, "step": 1}
    assert inp["data"]["type"] == "float32"
    assert "preprocessing" not in inp and "postprocessing" not in out
    assert out["axes"][2]["size"] == {"tensor_id": "input", "axis_id": "y"}
    assert out["data"]["type"] == "int32"
    tolerance = rdf["config"]["bioimageio"]["reproducibility_tolerance"][0]
    assert tolerance["absolute_tolerance"] == 0.0


# --------------------------------------------------------------------------- options
def test_export_command_writes_a_valid_zip_of_the_last_checkpoint(session, tmp_path):
    import torch

    report = bx.export_command_impl(
        session.path,
        tmp_path / "nuclei.zip",
        checkpoint="last",
        name="Nuclei and bacteria (tiny)",
        license="CC-BY-4.0",
        inference=NOISY,
        format="wrapper",
    )
    assert Path(report["zip_path"]).is_file()
    assert bx.validate_package(report["zip_path"]) == []
    assert report["checkpoint"] == "last" and report["weights_source"] == "last.pth"
    assert report["training_dataset_id"] == DATASET_ID
    rdf = yaml.safe_load((Path(report["path"]) / "rdf.yaml").read_text())
    assert rdf["name"] == "Nuclei and bacteria (tiny)"
    assert rdf["license"] == "CC-BY-4.0"
    exported = torch.load(Path(report["path"]) / "model_weights.pth", weights_only=True)
    last = torch.load(session.weights("last"), weights_only=True)
    assert all(torch.equal(exported[k], last[k]) for k in exported)


def test_parent_authors_and_a_large_sample_image(session, dev_data, tmp_path):
    from cellpose_finetuning.io.images import read_image

    big = np.tile(read_image(dev_data / "images" / "train" / "nuclei_00.tif"), (1, 3, 3))
    result = bx.build_package(
        session,
        tmp_path / "pkg",
        parent_id="affable-shark",
        # (a github_user would make the spec look the user up on GitHub)
        authors=[{"name": "Ada Lovelace", "affiliation": "Analytical Engines"}],
        uploader={"name": "Ada Lovelace", "email": "ada@example.org"},
        cite=[{"text": "Our screen paper", "doi": "10.5281/zenodo.1234567"}],
        documentation="Our own notes on this model.",
        sample_image=big,
        inference=NOISY,
        tags=["nuclei", "fluorescence-light-microscopy"],
        format="wrapper",
    )
    rdf = yaml.safe_load(result.rdf.read_text())
    assert rdf["parent"] == {"id": "affable-shark"}
    assert rdf["authors"] == [{"name": "Ada Lovelace", "affiliation": "Analytical Engines"}]
    assert rdf["uploader"] == {"name": "Ada Lovelace", "email": "ada@example.org"}
    assert rdf["cite"][-1] == {"text": "Our screen paper", "doi": "10.5281/zenodo.1234567"}
    assert (result.path / "doc.md").read_text().startswith("Our own notes on this model.")
    assert {"nuclei", "cellpose"} <= set(rdf["tags"])
    assert np.load(result.path / "input_sample.npy").shape == (1, 1, 512, 512)


def test_a_model_that_finds_nothing_is_refused_with_the_reason(session, tmp_path):
    # The untrained network finds no cells at cellpose's default thresholds.
    with pytest.raises(bx.ExportError, match="finds no objects") as info:
        bx.build_package(session, tmp_path / "pkg", format="wrapper")
    assert any("test set" in m for m in info.value.messages)


def test_unfinished_session_is_refused(tmp_path, train_pairs, test_pairs, tiny_model):
    import psutil

    session = _make_session(tmp_path / "s", train_pairs, test_pairs, tiny_model)
    session.update_status(
        status_type="running",
        worker_pid=os.getpid(),
        worker_create_time=psutil.Process().create_time(),
    )
    with pytest.raises(Conflict, match="running"):
        bx.build_package(session, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_non_empty_output_folder_is_refused(session, package):
    from cellpose_finetuning.errors import InvalidInput

    with pytest.raises(InvalidInput, match="not empty"):
        bx.build_package(session, package.path)
