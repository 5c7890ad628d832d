"""BioImage.IO export: turn a finished training session into a model package.

A package is a folder (or its zip) that ``bioimageio.spec`` validates and
``bioimageio.core`` runs::

    rdf.yaml            the model description (format 0.5, current spec version)
    model.py            architecture of the pytorch_state_dict weights
    model_weights.pth   plain cellpose state dict (no extra entries; strict load)
    input_sample.npy    a real image of the session, (1, C, H, W) float32
    output_sample.npy   what the package makes of it, (1, 1, H, W) labels
    cover.png           that image beside its segmentation
    doc.md              base model, data, settings, curves, metrics, usage, license
    environment.yaml    conda environment for the weights (``dependencies``)
    training_curves.png the session's loss/metric curves (an attachment)
    sample_input.tif    the test tensors as TIFF (the spec's ``sample_tensor``)
    sample_output.tif
    model_torchscript.pt, model.onnx(.data)   standard form only

Two forms (``format``):

- ``standard`` (default): ``model.py`` is the network alone
  (:mod:`.network`) on 256 px tiles with an output halo;
  cellpose's normalisation is the spec's ``scale_range`` preprocessing and
  its flow dynamics the ``cellpose_flow_dynamics`` postprocessing; weights
  also as ``torchscript`` and ``onnx`` (:mod:`.standard`). The
  test tensors are a 256 px tile and what ``bioimageio.core`` makes of it.
- ``wrapper``: ``model.py`` runs cellpose's whole ``eval`` on raw images of
  any size and returns labels (:mod:`.wrapper`), so the
  description lists no processing steps; for consumers without
  ``cellpose_flow_dynamics`` (bioimageio.core < 0.11).

The original service's export failed validation (extra top-level fields,
``parent`` as a string, ground truth as the test output, fixed image sizes,
no batch axis on test tensors). Here every package is validated with the
spec's own rules before :func:`build_package` returns, and an invalid one is
refused with the spec's messages. A failed export leaves no files behind.

Modules, one job each: :mod:`.package` (build, zip, export: the entry
points), :mod:`.metadata` (arguments, lineage, license, metrics),
:mod:`.samples` (the sample image, test tensors, cover), :mod:`.rdf`
(``rdf.yaml``), :mod:`.documentation` (``doc.md``), :mod:`.checks`
(``bioimageio.spec`` validation, ``bioimageio.core`` test), :mod:`.runtime`
(running a package's ``model.py``), :mod:`.standard` (the standard form's
tensors, processing, weight conversion), and the two ``model.py`` sources,
:mod:`.network` and :mod:`.wrapper`.
"""

from cellpose_finetuning.export.bioimageio.checks import test_package, validate_package
from cellpose_finetuning.export.bioimageio.common import (
    CONTRACT_FILES,
    MIN_SPATIAL_SIZE,
    ExportError,
    ModelTestReport,
    PackageFormat,
    PackageResult,
)
from cellpose_finetuning.export.bioimageio.package import (
    build_package,
    export_command_impl,
    model_source,
    zip_package,
)
from cellpose_finetuning.export.bioimageio.runtime import package_predictor, run_exported_model

__all__ = [
    "CONTRACT_FILES",
    "MIN_SPATIAL_SIZE",
    "ExportError",
    "ModelTestReport",
    "PackageFormat",
    "PackageResult",
    "build_package",
    "export_command_impl",
    "model_source",
    "package_predictor",
    "run_exported_model",
    "test_package",
    "validate_package",
    "zip_package",
]
