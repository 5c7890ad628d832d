"""Standard-form BioImage.IO packages: the network in three weight formats, cellpose's steps as
the spec's (scale_range, cellpose_flow_dynamics).

One package is built through the CLI (with every metadata option) from a hand-made session
with an untrained tiny network, at thresholds that let it output many (noise) labels
(cellprob -3, no flow check: with fewer foreground pixels its random flows find no seeds),
so the comparisons are between non-trivial label images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.export import bioimageio as bx
from cellpose_finetuning.export.bioimageio import standard as std
from tests.export.test_bioimageio import DATASET_ID, _make_session

THRESHOLDS = {"cellprob_threshold": -3.0, "flow_threshold": 0.0}
FORMATS = std.WEIGHT_FORMATS


@pytest.fixture(scope="module")
def session(tmp_path_factory, train_pairs, test_pairs, tiny_model):
    return _make_session(tmp_path_factory.mktemp("sessions"), train_pairs, test_pairs, tiny_model)


@pytest.fixture(scope="module")
def exported(session, tmp_path_factory) -> dict:
    """``cellpose-finetuning export`` with every metadata option; its JSON report."""
    from click.testing import CliRunner

    from cellpose_finetuning.cli import main

    root = tmp_path_factory.mktemp("standard")
    doc = root / "notes.md"
    doc.write_text("# Nuclei model\n\nTrained for the lab's DAPI screens.\n")
    args = [
        "export",
        str(session.path),
        "--out",
        str(root / "nuclei.zip"),
        "--cellprob-threshold",
        str(THRESHOLDS["cellprob_threshold"]),
        "--flow-threshold",
        str(THRESHOLDS["flow_threshold"]),
        "--author",
        "Ada Lovelace; Analytical Engines",
        "--author",
        '{"name": "Charles Babbage", "email": "cb@example.org"}',
        "--cite",
        "Our screen paper; 10.5281/zenodo.1234567",
        "--tag",
        "nuclei",
        "--tag",
        "fluorescence-light-microscopy",
        "--description",
        "Nuclei in DAPI images, tiny test network.",
        "--documentation",
        str(doc),
    ]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


@pytest.fixture(scope="module")
def package(exported) -> Path:
    return Path(exported["path"])


@pytest.fixture(scope="module")
def rdf(package) -> dict:
    return yaml.safe_load((package / "rdf.yaml").read_text())


@pytest.fixture(scope="module")
def core_report(exported) -> bx.ModelTestReport:
    """bioimageio.core's model test of the zip, every weight format."""
    return bx.test_package(exported["zip_path"])


def _engine_labels_on_tile(session, tile: np.ndarray, settings: InferenceSettings) -> np.ndarray:
    """Our engine's network and cellpose's own normalize99 and flow dynamics on one 256 px tile."""
    import torch
    from cellpose import dynamics, transforms

    from cellpose_finetuning.engine.models import load_network

    net, _ = load_network(session.weights("best"))
    x = np.zeros((1, 3, *tile.shape[-2:]), np.float32)
    for c in range(tile.shape[0]):
        x[0, c] = transforms.normalize99(tile[c])
    with torch.no_grad():
        y = net.eval()(torch.from_numpy(x))[0][0].numpy()
    return dynamics.resize_and_compute_masks(
        y[:2],
        y[2],
        niter=200,
        cellprob_threshold=settings.cellprob_threshold,
        flow_threshold=settings.flow_threshold,
        min_size=settings.min_size,
    )


def _ap50(truth: np.ndarray, pred: np.ndarray) -> float:
    from cellpose.metrics import average_precision

    ap, *_ = average_precision([truth.astype("int32")], [pred.astype("int32")], threshold=[0.5])
    return float(ap[0][0])


# --------------------------------------------------------------------------- the package
def test_standard_package_holds_three_weight_formats_and_validates(exported, package):
    names = {p.name for p in package.iterdir()}
    assert set(bx.CONTRACT_FILES) <= names
    assert {std.TORCHSCRIPT_FILE, std.ONNX_FILE, "training_curves.png", "cover.png"} <= names
    assert exported["format"] == "standard"
    assert bx.validate_package(package) == []
    assert bx.validate_package(exported["zip_path"]) == []


def test_rdf_declares_network_tiles_with_a_halo(rdf):
    (inp,) = rdf["inputs"]
    (out,) = rdf["outputs"]
    assert [a.get("size") for a in inp["axes"][2:]] == [256, 256]
    assert [a["halo"] for a in out["axes"][2:]] == [std.HALO, std.HALO]
    assert out["axes"][2]["size"] == {"tensor_id": "input", "axis_id": "y"}
    assert inp["preprocessing"][0] == {
        "id": "scale_range",
        "kwargs": {"axes": ["y", "x"], "min_percentile": 1.0, "max_percentile": 99.0},
    }


def test_rdf_postprocessing_is_cellpose_flow_dynamics_with_the_export_settings(rdf):
    (out,) = rdf["outputs"]
    (step,) = out["postprocessing"]
    assert step["id"] == "cellpose_flow_dynamics"
    assert step["kwargs"]["cellprob_threshold"] == THRESHOLDS["cellprob_threshold"]
    assert step["kwargs"]["flow_threshold"] == THRESHOLDS["flow_threshold"]
    assert step["kwargs"]["min_size"] == InferenceSettings().min_size
    assert out["data"]["type"] == std.LABELS_DTYPE


def test_rdf_weights_are_three_entries_linked_to_the_state_dict(rdf):
    weights = rdf["weights"]
    assert set(weights) == set(FORMATS)
    assert weights["pytorch_state_dict"]["architecture"]["callable"] == std.NETWORK_CALLABLE
    assert weights["pytorch_state_dict"]["architecture"]["kwargs"]["in_channels"] == 1
    assert weights["torchscript"]["parent"] == "pytorch_state_dict"
    assert weights["onnx"]["parent"] == "pytorch_state_dict"
    assert weights["onnx"]["opset_version"] >= 15


def test_metadata_from_the_cli_reaches_the_rdf_and_doc(rdf, package):
    assert rdf["authors"] == [
        {"name": "Ada Lovelace", "affiliation": "Analytical Engines"},
        {"name": "Charles Babbage", "email": "cb@example.org"},
    ]
    dois = [c.get("doi") for c in rdf["cite"]]
    assert dois[:2] == ["10.1038/s41592-020-01018-x", "10.1101/2025.04.28.651001"]
    assert "10.5281/zenodo.1234567" in dois
    assert {"nuclei", "fluorescence-light-microscopy", "onnx", "torchscript"} <= set(rdf["tags"])
    # as the original service: the given description is added to the generated one
    assert rdf["description"].endswith(" Nuclei in DAPI images, tiny test network.")
    doc = (package / "doc.md").read_text()
    assert doc.startswith("# Nuclei model\n\nTrained for the lab's DAPI screens.")
    assert "cellpose_flow_dynamics" in doc and "## Validation" in doc
    assert rdf["training_data"] == {"id": DATASET_ID}


def test_bioimageio_core_model_test_passes_for_each_weight_format(core_report):
    assert core_report.passed, core_report.errors
    names = {t["name"]: t["status"] for t in core_report.tests}
    for wf in FORMATS:
        assert names[f"Reproduce test outputs from test inputs ({wf})"] == "passed"
        assert (
            names[f"Run {wf} inference for inputs with batch_size: 2 and size parameter n: 0"]
            == "passed"
        )


# --------------------------------------------------------------------------- against the engine
def test_converted_networks_give_the_pytorch_flows_on_a_tile(package, session):
    import onnxruntime
    import torch

    from cellpose_finetuning.engine.models import load_network

    rng = np.random.default_rng(0)
    tile = rng.random((1, 1, 256, 256), dtype=np.float32)
    net, _ = load_network(session.weights("best"))
    padded = np.concatenate([tile, np.zeros((1, 2, 256, 256), np.float32)], axis=1)
    with torch.no_grad():
        reference = net.eval()(torch.from_numpy(padded))[0].numpy()
        scripted = torch.jit.load(package / std.TORCHSCRIPT_FILE)(torch.from_numpy(tile)).numpy()
    onnx = onnxruntime.InferenceSession(str(package / std.ONNX_FILE)).run(None, {"input": tile})[0]
    assert reference.shape == scripted.shape == onnx.shape == (1, 3, 256, 256)
    assert np.abs(scripted - reference).max() <= 1e-4
    assert np.abs(onnx - reference).max() <= 1e-4


def test_package_labels_on_its_tile_match_the_engine(package, session):
    """Same tile, same network pass: bioimage.io's steps give cellpose's own masks."""
    tile = np.load(package / "input_sample.npy")[0]
    expected = _engine_labels_on_tile(session, tile, InferenceSettings(**THRESHOLDS))
    assert expected.max() > 1
    output = np.load(package / "output_sample.npy")
    np.testing.assert_array_equal(output[0, 0], expected)
    # (the model test reproduces output_sample.npy with every format; here the converted
    # networks' labels are also matched object by object)
    for wf in ("torchscript", "onnx"):
        labels = std.run_package_on_test_input(package, wf)[0, 0]
        assert _ap50(expected, labels) >= 0.99, wf


def test_infer_with_the_package_zip_gives_the_sessions_masks(
    exported, session, test_pairs, tmp_path
):
    from click.testing import CliRunner

    from cellpose_finetuning.cli import main
    from cellpose_finetuning.io.images import read_mask

    image = test_pairs[0][0]
    masks = {}
    for name, model in (("session", session.path), ("zip", exported["zip_path"])):
        out = tmp_path / name
        args = ["infer", "--model", str(model), str(image), "--out", str(out)]
        args += ["--cellprob-threshold", "-3", "--flow-threshold", "0"]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        masks[name] = read_mask(next(out.glob("*_masks.tif")))
    assert masks["zip"].max() > 0
    np.testing.assert_array_equal(masks["zip"], masks["session"])


# --------------------------------------------------------------------------- refusals
def test_a_model_that_finds_nothing_names_the_images_and_leaves_nothing(session, tmp_path):
    out = tmp_path / "pkg"
    with pytest.raises(bx.ExportError, match="cellprob_threshold") as info:
        bx.build_package(session, out, inference=InferenceSettings(cellprob_threshold=6.0))
    message = str(info.value)
    assert "(test set)" in message and "(training set)" in message
    assert "train longer" in message
    assert not out.exists()


def test_diameter_cannot_be_expressed_in_the_standard_form(session, tmp_path):
    from cellpose_finetuning.errors import InvalidInput

    with pytest.raises(InvalidInput, match="diameter.*wrapper"):
        bx.build_package(session, tmp_path / "pkg", inference=InferenceSettings(diameter=17.0))
    assert not (tmp_path / "pkg").exists()


# --------------------------------------------------------------------------- model.py sources
@pytest.mark.parametrize("form", ["standard", "wrapper"])
def test_model_py_carries_the_engines_encoder_builder_and_imports_nothing_of_ours(form):
    """One source for the encoder: the package's model.py holds engine/sam_encoder.py's text."""
    import ast
    import inspect

    import torch

    from cellpose_finetuning.engine import sam_encoder
    from cellpose_finetuning.engine.models import PRESETS, build_network

    source = bx.model_source(form)
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {m for m in imported if m.split(".")[0] == "cellpose_finetuning"}, imported
    assert inspect.getsource(sam_encoder.encoder_builder) in source
    # The text alone builds the engine's network: same parameters, strict load.
    namespace: dict = {"__name__": f"exported_{form}"}
    exec(compile(source, "model.py", "exec"), namespace)
    arch = PRESETS["tiny"]
    kwargs = {
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "global_attn_indexes": arch.global_attn_indexes,
    }
    callable_name = "CellposeSAMFlows" if form == "standard" else "CellposeSAMSegmenter"
    model = namespace[callable_name](**kwargs)
    engine = build_network(arch)
    model.load_state_dict(engine.state_dict(), strict=True)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in engine.parameters())
    assert isinstance(model, torch.nn.Module)


def test_network_traces_as_it_runs_even_when_traced_without_eval():
    """bioimageio.core's torchscript converter traces the module as constructed, without .eval().

    cellpose's training-mode forward drops encoder blocks at random (``rdrop``, by depth: a
    one-block network never drops one), and a trace freezes that into the graph; the exported
    network is built for inference, so its trace must be deterministic and equal to it.
    """
    import torch

    from cellpose_finetuning.export.bioimageio.network import CellposeSAMFlows

    torch.manual_seed(0)
    net = CellposeSAMFlows(embed_dim=32, depth=4, num_heads=1, global_attn_indexes=(3,))
    assert not net.training and net.rdrop == 0.0
    tile = torch.from_numpy(np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32))
    with torch.no_grad():
        traced = torch.jit.trace(net, tile)
        net.train()  # even a caller's .train() cannot bring stochastic depth back
        expected = net(tile)
        assert "aten::rand" not in {n.kind() for n in traced.inlined_graph.nodes()}
        for _ in range(2):
            assert float((traced(tile) - expected).abs().max()) <= 1e-4
