"""The model description (``rdf.yaml``) of both forms."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from cellpose_finetuning.export.bioimageio.common import (
    _WRAPPER_CALLABLE,
    CURVES_FILE,
    ENVIRONMENT_FILE,
    INPUT_ID,
    MIN_SPATIAL_SIZE,
    MISMATCHED_PIXELS_PER_MILLION,
    OUTPUT_ID,
    SAMPLE_INPUT_FILE,
    SAMPLE_OUTPUT_FILE,
    _file,
    _fill_hashes,
    _package_version,
    _Plan,
    _write_yaml,
)
from cellpose_finetuning.export.bioimageio.documentation import _doc
from cellpose_finetuning.export.bioimageio.metadata import (
    _arch_kwargs,
    _training_details,
    _valid_dataset_id,
)

log = logging.getLogger(__name__)


def _rdf(plan: _Plan) -> dict[str, Any]:
    """The model description, as plain YAML data (hashes still empty)."""
    import torch
    from bioimageio.spec.model.v0_5 import ModelDescr

    if plan.format == "standard":
        return _rdf_standard(plan)
    spatial_in = [
        {"type": "space", "id": ax, "size": {"min": MIN_SPATIAL_SIZE, "step": 1}}
        for ax in ("y", "x")
    ]
    spatial_out = [
        {"type": "space", "id": ax, "size": {"tensor_id": INPUT_ID, "axis_id": ax}}
        for ax in ("y", "x")
    ]
    rdf: dict[str, Any] = {
        "type": "model",
        "format_version": ModelDescr.implemented_format_version,
        "name": plan.name,
        "description": plan.description,
        "authors": plan.authors,
        "cite": plan.cite,
        "license": plan.license,
        "tags": plan.tags,
        "documentation": _file("doc.md"),
        "covers": [_file("cover.png")],
        "attachments": [_file(CURVES_FILE)] if plan.has_curves else [],
        "timestamp": plan.timestamp,
        "inputs": [
            {
                "id": INPUT_ID,
                "description": "Raw 2D image(s), any intensity range: do not normalise, the "
                "model rescales each channel to its 1-99 percentiles itself.",
                "axes": [
                    {"type": "batch"},
                    {
                        "type": "channel",
                        "channel_names": [f"channel{i}" for i in range(plan.n_channels)],
                    },
                    *spatial_in,
                ],
                "data": {"type": "float32"},
                "test_tensor": _file("input_sample.npy"),
                "sample_tensor": _file(SAMPLE_INPUT_FILE),
            }
        ],
        "outputs": [
            {
                "id": OUTPUT_ID,
                "description": "Instance labels, 0 = background (cellpose masks).",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["labels"]},
                    *spatial_out,
                ],
                "data": {"type": "int32"},
                "test_tensor": _file("output_sample.npy"),
                "sample_tensor": _file(SAMPLE_OUTPUT_FILE),
            }
        ],
        "weights": {
            "pytorch_state_dict": {
                **_file("model_weights.pth"),
                "architecture": {
                    **_file("model.py"),
                    "callable": _WRAPPER_CALLABLE,
                    "kwargs": {**_arch_kwargs(plan.arch), **plan.inference},
                },
                "pytorch_version": torch.__version__.split("+")[0],
                "dependencies": _file(ENVIRONMENT_FILE),
                "strict": True,
            }
        },
        "config": {
            "bioimageio": {
                "reproducibility_tolerance": [
                    {
                        "relative_tolerance": 0.0,
                        "absolute_tolerance": 0.0,
                        "mismatched_elements_per_million": MISMATCHED_PIXELS_PER_MILLION,
                        "output_ids": [OUTPUT_ID],
                    }
                ],
                "architecture_type": "ViT (SAM) + cellpose flows",
                "architecture_description": "Cellpose-SAM: SAM ViT image encoder with 8 px "
                "tokens and a linear readout of XY flows and cell probability, followed by "
                "cellpose flow dynamics (run inside model.py).",
                "task": "instance segmentation",
                "model_parameter_count": plan.n_params,
                "training": _training_details(plan.settings, plan.status),
            },
            "cellpose_finetuning": {
                "exporter": f"cellpose-finetuning {_package_version()}",
                "session_id": plan.session_id,
                "checkpoint": plan.checkpoint,
                "weights_file": plan.weights_file,
                "base_model": plan.base,
                "architecture": plan.arch.model_dump(mode="json"),
                "training_dataset_id": plan.dataset_id,
                "data": {
                    "n_train": plan.n_train,
                    "n_test": plan.n_test,
                    "sample": plan.sample_name,
                },
                "settings": plan.settings,
                "metrics": plan.metrics,
                "inference": plan.inference,
            },
        },
    }
    return _lineage(rdf, plan)


def _rdf_standard(plan: _Plan) -> dict[str, Any]:
    """The standard form: the wrapper's description with the network's tensors and weights."""
    import torch

    from cellpose_finetuning.export.bioimageio import standard as std

    rdf = _rdf(dataclasses.replace(plan, format="wrapper"))
    inp, out = std.standard_tensors(
        bsize=plan.arch.bsize,
        n_channels=plan.n_channels,
        input_id=INPUT_ID,
        output_id=OUTPUT_ID,
        inference=plan.inference,
        file=_file,
        sample_input=SAMPLE_INPUT_FILE,
        sample_output=SAMPLE_OUTPUT_FILE,
    )
    rdf["inputs"], rdf["outputs"] = [inp], [out]
    rdf["weights"] = {
        "pytorch_state_dict": {
            **_file("model_weights.pth"),
            "architecture": {
                **_file("model.py"),
                "callable": std.NETWORK_CALLABLE,
                "kwargs": {**_arch_kwargs(plan.arch), "in_channels": plan.n_channels},
            },
            "pytorch_version": torch.__version__.split("+")[0],
            "dependencies": _file(ENVIRONMENT_FILE),
            "strict": True,
        },
        **plan.weights,
    }
    bio = rdf["config"]["bioimageio"]
    bio["architecture_description"] = (
        "Cellpose-SAM: SAM ViT image encoder with 8 px tokens and a linear readout of XY "
        "flows and cell probability. Normalisation is the scale_range preprocessing and "
        "cellpose's flow dynamics the cellpose_flow_dynamics postprocessing."
    )
    # Labels may differ in a few pixels where converted weights round differently.
    bio["reproducibility_tolerance"][0]["mismatched_elements_per_million"] = (
        MISMATCHED_PIXELS_PER_MILLION
    )
    rdf["config"]["cellpose_finetuning"]["format"] = "standard"
    return rdf


def _lineage(rdf: dict[str, Any], plan: _Plan) -> dict[str, Any]:
    """Add ``parent``, ``training_data`` and ``uploader`` where they are known."""
    if plan.uploader:
        rdf["uploader"] = dict(plan.uploader)
    if plan.parent_id:
        rdf["parent"] = {"id": plan.parent_id}
    if _valid_dataset_id(plan.dataset_id):
        rdf["training_data"] = {"id": plan.dataset_id}
    elif plan.dataset_id:
        log.warning("dataset id %r is not a valid bioimage.io id; kept in config", plan.dataset_id)
    return rdf


def _write_rdf(plan: _Plan, out: Path) -> None:
    """Write ``doc.md`` and ``rdf.yaml`` (with the hashes of every file it names)."""
    rdf = _rdf(plan)
    (out / "doc.md").write_text(_doc(plan), encoding="utf-8")
    _fill_hashes(rdf, out)
    _write_yaml(rdf, out / "rdf.yaml")
