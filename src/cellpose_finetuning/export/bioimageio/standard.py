"""The standard form of a BioImage.IO package: the network alone, cellpose's steps as the spec's.

A standard-form package carries only Cellpose-SAM's network
(:mod:`cellpose_finetuning.export.bioimageio.network`) and describes the rest
of cellpose's pipeline with the spec's own processing steps, so any
consumer that implements them (``bioimageio.core`` >= 0.11) runs it without
our code:

- input: ``(batch, channel, y, x)`` tiles of exactly the network's
  ``bsize`` (256) pixels; the output axes declare a halo of
  :data:`HALO` pixels, so a consumer cuts larger images into overlapping
  256 px blocks and crops the halo of each (``bioimageio.core`` does this in
  ``predict(..., blocksize_parameter=...)``);
- preprocessing ``scale_range`` with percentiles 1 and 99 per channel and
  image (cellpose's ``normalize99``);
- the network's output: Y flow, X flow and cell probability;
- postprocessing ``cellpose_flow_dynamics`` with the export's thresholds
  and ``min_size``: the output tensor is the instance labels.

Weights come in three formats, each its own entry: ``pytorch_state_dict``
(a plain cellpose state dict and ``model.py``), and ``torchscript`` and
``onnx`` converted from it with ``bioimageio.core``'s own weight converters
(``parent: pytorch_state_dict``).

Cellpose's own ``eval`` differs in two ways a description cannot express:
it blends overlapping tiles where bioimage.io crops halos, and it pads the
image border with zeros after normalising where bioimage.io pads the raw
image (here with :data:`PAD_MODE`). Masks agree except near tile seams and
image borders; on one 256 px tile the flows are the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "HALO",
    "LABELS_DTYPE",
    "NETWORK_CALLABLE",
    "ONNX_FILE",
    "PAD_MODE",
    "PERCENTILES",
    "TORCHSCRIPT_FILE",
    "WEIGHT_FORMATS",
    "convert_weights",
    "fit_to_tile",
    "predict_image",
    "run_package_on_test_input",
    "standard_tensors",
]

#: Halo cropped from each side of every output block (1/8 of a 256 px tile).
HALO = 32
#: How bioimage.io pads the raw image beyond its border (cellpose pads zeros
#: after normalising; reflecting the image is the closest a description can say).
PAD_MODE = "reflect"
#: cellpose's normalize99.
PERCENTILES = (1.0, 99.0)
LABELS_DTYPE = "uint16"
NETWORK_CALLABLE = "CellposeSAMFlows"
TORCHSCRIPT_FILE = "model_torchscript.pt"
ONNX_FILE = "model.onnx"
WeightFormat = Literal["pytorch_state_dict", "torchscript", "onnx"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = ("pytorch_state_dict", "torchscript", "onnx")


def standard_tensors(
    *,
    bsize: int,
    n_channels: int,
    input_id: str,
    output_id: str,
    inference: Mapping[str, Any],
    file: Any,
    sample_input: str,
    sample_output: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``inputs[0]`` and ``outputs[0]`` entries of a standard-form rdf.

    ``file(name)`` makes a file entry (its hash is filled in later).
    """
    spatial_in = [{"type": "space", "id": ax, "size": bsize} for ax in ("y", "x")]
    spatial_out = [
        {"type": "space", "id": ax, "size": {"tensor_id": input_id, "axis_id": ax}, "halo": HALO}
        for ax in ("y", "x")
    ]
    low, high = PERCENTILES
    inp = {
        "id": input_id,
        "description": f"Raw 2D image tiles, any range (scale_range normalises with the "
        f"{low:g}/{high:g} percentiles). Tile larger images with the halo.",
        "axes": [
            {"type": "batch"},
            {"type": "channel", "channel_names": [f"channel{i}" for i in range(n_channels)]},
            *spatial_in,
        ],
        "data": {"type": "float32"},
        "test_tensor": file("input_sample.npy"),
        "sample_tensor": file(sample_input),
        "pad": {"mode": PAD_MODE},
        "preprocessing": [
            {
                "id": "scale_range",
                "kwargs": {
                    "axes": ["y", "x"],
                    "min_percentile": low,
                    "max_percentile": high,
                },
            }
        ],
    }
    out = {
        "id": output_id,
        "description": "Instance labels (0 = background) from the network's Y/X flows and "
        "cell probability by cellpose_flow_dynamics.",
        "axes": [
            {"type": "batch"},
            {"type": "channel", "channel_names": ["labels"]},
            *spatial_out,
        ],
        "data": {"type": LABELS_DTYPE},
        "test_tensor": file("output_sample.npy"),
        "sample_tensor": file(sample_output),
        "postprocessing": [
            {
                "id": "cellpose_flow_dynamics",
                "kwargs": {
                    "cellprob_threshold": float(inference["cellprob_threshold"]),
                    "flow_threshold": float(inference["flow_threshold"]),
                    "do_3D": False,
                    "min_size": int(inference["min_size"]),
                    "output_dtype": LABELS_DTYPE,
                },
            }
        ],
    }
    return inp, out


def fit_to_tile(image: np.ndarray, bsize: int) -> tuple[np.ndarray, bool]:
    """Centre-crop (C, H, W) to ``bsize`` px per side, reflect-padding smaller sides.

    Returns the tile and whether anything was cropped or padded.
    """
    h, w = image.shape[-2:]
    top, left = max(0, (h - bsize) // 2), max(0, (w - bsize) // 2)
    tile = image[..., top : top + bsize, left : left + bsize]
    ph, pw = bsize - tile.shape[-2], bsize - tile.shape[-1]
    if ph or pw:
        tile = np.pad(
            tile, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="reflect"
        )
    return np.ascontiguousarray(tile, dtype=np.float32), (h, w) != (bsize, bsize)


def _load(package: str | os.PathLike[str], *, io_checks: bool) -> Any:
    from bioimageio.spec import load_model_description

    path = Path(package)
    if path.is_dir():
        path = path / "rdf.yaml"
    return load_model_description(path, perform_io_checks=io_checks)


def run_package_on_test_input(
    package_dir: str | os.PathLike[str], weight_format: WeightFormat = "pytorch_state_dict"
) -> np.ndarray:
    """Labels for the package's test input, computed as ``bioimageio.core``'s model test does.

    The description is loaded without IO checks, so the test output may
    still be a placeholder: this is how the real one is made.
    """
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import get_test_input_sample

    descr = _load(package_dir, io_checks=False)
    sample = get_test_input_sample(descr)
    with create_prediction_pipeline(descr, weights_format=weight_format) as pipeline:
        pipeline.apply_preprocessing(sample)
        result = pipeline.predict_sample_without_blocking(
            sample,
            skip_preprocessing=True,
            skip_postprocessing=False,
            skip_input_padding=True,
            skip_output_cropping=True,
        )
    (member,) = result.members.values()
    return np.asarray(member.data, dtype=LABELS_DTYPE)


def convert_weights(package_dir: Path, formats: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Convert the package's ``pytorch_state_dict`` weights with ``bioimageio.core``.

    Returns the rdf ``weights`` entries (hashes still empty) for ``formats``
    (``torchscript``, ``onnx``), each with ``parent: pytorch_state_dict``.
    """
    import torch

    descr = _load(package_dir, io_checks=False)
    entries: dict[str, dict[str, Any]] = {}
    if "torchscript" in formats:
        from bioimageio.core.weight_converters.pytorch_to_torchscript import convert

        convert(descr, package_dir / TORCHSCRIPT_FILE, use_tracing=True)
        entries["torchscript"] = {
            "source": TORCHSCRIPT_FILE,
            "sha256": None,
            "pytorch_version": torch.__version__.split("+")[0],
            "parent": "pytorch_state_dict",
            "comment": "traced from the pytorch_state_dict weights by bioimageio.core",
        }
    if "onnx" in formats:
        from bioimageio.core.weight_converters.pytorch_to_onnx import convert as to_onnx

        onnx = to_onnx(descr, package_dir / ONNX_FILE, opset_version=18)
        entry: dict[str, Any] = {
            "source": ONNX_FILE,
            "sha256": None,
            "opset_version": int(onnx.opset_version),
            "parent": "pytorch_state_dict",
            "comment": "exported from the pytorch_state_dict weights by bioimageio.core",
        }
        if onnx.external_data is not None:
            entry["external_data"] = {
                "source": Path(str(onnx.external_data.source)).name,
                "sha256": None,
            }
        entries["onnx"] = entry
    return entries


def predict_image(
    package: str | os.PathLike[str],
    image: np.ndarray,
    weight_format: WeightFormat | None = None,
) -> np.ndarray:
    """Segment one (C, H, W) image with a standard-form package, tiled by ``bioimageio.core``.

    Images smaller than the tile are reflect-padded to it and the labels
    cropped back. Returns (H, W) labels.
    """
    from bioimageio.core import create_prediction_pipeline, predict

    descr = _load(package, io_checks=False)
    bsize = int(descr.inputs[0].axes[2].size)
    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape[-2:]
    ph, pw = max(0, bsize - h), max(0, bsize - w)
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="reflect")
    pipeline = create_prediction_pipeline(descr, weights_format=weight_format)
    input_id = str(descr.inputs[0].id)
    result = predict(model=pipeline, inputs={input_id: image[None]}, blocksize_parameter=0)
    (member,) = result.members.values()
    labels = np.asarray(member.data).reshape(member.data.shape[-2:])
    return labels[:h, :w]
