"""Validation with ``bioimageio.spec`` and ``bioimageio.core``'s model test."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.export.bioimageio.common import ModelTestReport


def _format_entry(entry: Any) -> str:
    loc = ".".join(str(part) for part in entry.loc)
    return f"{loc}: {entry.msg}" if loc else str(entry.msg)


def _summary_messages(summary: Any) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    for detail in summary.details:
        errors.extend(_format_entry(e) for e in detail.errors)
        warnings.extend(_format_entry(w) for w in detail.warnings)
    return errors, warnings


def _validate(source: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Load a package with the spec's IO checks; return (errors, warnings)."""
    from bioimageio.spec import load_description

    path = Path(source)
    if path.is_dir():
        path = path / "rdf.yaml"
    if not path.exists():
        raise InvalidInput(
            str(source), "no such package (expected a folder with rdf.yaml or a zip)"
        )
    descr = load_description(path, perform_io_checks=True)
    errors, warnings = _summary_messages(descr.validation_summary)
    if descr.validation_summary.status == "failed" and not errors:
        errors = ["validation failed (no message given by bioimageio.spec)"]
    return errors, warnings


def validate_package(source: str | os.PathLike[str]) -> list[str]:
    """Validate a package folder, ``rdf.yaml`` or zip with ``bioimageio.spec``.

    Files are opened and checked (hashes, test tensors against the axes,
    documentation), without network access for anything the packages we
    write refer to.

    Parameters
    ----------
    source : path-like
        Package folder, its ``rdf.yaml``, or a zip.

    Returns
    -------
    list of str
        The spec's error messages, ``"<location>: <message>"``; empty when
        the package is valid.
    """
    return _validate(source)[0]


def test_package(
    source: str | os.PathLike[str],
    *,
    devices: Sequence[str] | None = None,
    weight_format: str | None = None,
) -> ModelTestReport:
    """Run ``bioimageio.core``'s model test on a package folder or zip.

    The test loads the weights into ``model.py`` (strict), reproduces
    ``output_sample.npy`` from ``input_sample.npy`` within the tolerance in
    ``config.bioimageio.reproducibility_tolerance``, and runs the model on
    inputs of other sizes and batch sizes.

    ``weight_format`` tests one format (``pytorch_state_dict``,
    ``torchscript``, ``onnx``); by default every format in the package.

    Returns
    -------
    ModelTestReport
        ``passed`` and the messages of every sub-test.
    """
    from bioimageio.core import test_model

    path = Path(source)
    if path.is_dir():
        path = path / "rdf.yaml"
    if not path.exists():
        raise InvalidInput(str(source), "no such package")
    summary = test_model(
        path,
        weight_format=weight_format,  # type: ignore[arg-type]
        devices=list(devices) if devices else None,
    )
    errors, warnings = _summary_messages(summary)
    tests = [
        {
            "name": d.name,
            "status": d.status,
            "errors": [_format_entry(e) for e in d.errors],
        }
        for d in summary.details
    ]
    return ModelTestReport(
        passed=summary.status == "passed",
        status=str(summary.status),
        errors=errors,
        warnings=warnings,
        tests=tests,
    )


test_package.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
