"""Building, zipping and exporting a package: the public entry points."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cellpose_finetuning.engine.models import read_state_dict
from cellpose_finetuning.engine.schemas import InferenceSettings, TrainingStatus
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.export.bioimageio.checks import _validate, test_package, validate_package
from cellpose_finetuning.export.bioimageio.common import (
    _MODEL_MODULES,
    _WRAPPER_CALLABLE,
    CONTRACT_FILES,
    CURVES_FILE,
    DEFAULT_TAGS,
    ENVIRONMENT_FILE,
    STANDARD_TAGS,
    ExportError,
    PackageFormat,
    PackageResult,
    _Plan,
)
from cellpose_finetuning.export.bioimageio.metadata import (
    _arch_kwargs,
    _authors,
    _base_model,
    _citations,
    _default_description,
    _documentation,
    _exportable_status,
    _inference_kwargs,
    _metrics,
    _open_session,
    _safe_name,
    _settings_for_export,
    _start_model,
    _tags,
    _uploader,
    _valid_model_id,
)
from cellpose_finetuning.export.bioimageio.rdf import _write_rdf
from cellpose_finetuning.export.bioimageio.runtime import _load_exported_model
from cellpose_finetuning.export.bioimageio.samples import (
    _label_standard_sample,
    _sample_candidates,
    _segment_a_sample,
    _write_cover,
    _write_sample_tiffs,
)

if TYPE_CHECKING:
    import torch


def build_package(
    session: Session | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    checkpoint: Literal["best", "last"] = "best",
    model_name: str | None = None,
    description: str | None = None,
    authors: Sequence[str | Mapping[str, Any]] | None = None,
    uploader: Mapping[str, Any] | None = None,
    cite: Sequence[Mapping[str, Any]] | None = None,
    tags: Sequence[str] | None = None,
    documentation: str | os.PathLike[str] | None = None,
    license: str | None = None,
    sample_image: str | os.PathLike[str] | np.ndarray | None = None,
    inference: InferenceSettings | None = None,
    parent_id: str | None = None,
    format: PackageFormat = "standard",
    overwrite: bool = False,
) -> PackageResult:
    """Write a validated BioImage.IO model package for a finished session.

    Parameters
    ----------
    session : Session or path-like
        A completed or stopped training session (its folder).
    out_dir : path-like
        Folder to write the package files into (created; must be empty
        unless ``overwrite``). Removed again if the export fails.
    checkpoint : {"best", "last"}
        Which weights: best by test loss (falls back to last) or last.
    model_name : str, optional
        Model name (letters, digits, ``_+-()`` and spaces, 5-128 characters).
    description : str, optional
        One-paragraph description; generated from the session by default.
    authors : list of str or dict, optional
        Names, or dicts with ``name`` and optionally ``affiliation``,
        ``email``, ``github_user``, ``orcid``. Default: the session's owner,
        else "cellpose-finetuning".
    uploader : dict, optional
        ``{"name": ..., "email": ...}`` of who uploads the model.
    cite : list of dict, optional
        Extra citations (``text`` and ``doi`` or ``url``), after cellpose's,
        Cellpose-SAM's and SAM's.
    tags : list of str, optional
        Extra tags (e.g. modality and content tags).
    documentation : str or os.PathLike, optional
        Markdown put at the top of ``doc.md`` (the generated training,
        validation and usage sections follow): a ``str`` is the text, a
        ``pathlib.Path`` a file to read.
    license : str, optional
        SPDX id. Default: the base model's (BSD-3-Clause for Cellpose-SAM,
        as on MouseLand's Hugging Face card), MIT for networks trained from
        scratch (tiny/small presets).
    sample_image : path-like or numpy.ndarray, optional
        Image for the test tensors and cover. Default: the first of the
        session's test images, then training images (at most 5 tried), in
        which the model finds objects.
    inference : InferenceSettings, optional
        Thresholds (and, for the wrapper, diameter) built into the model.
    parent_id : str, optional
        bioimage.io id of the base model, written as ``parent``. None by
        default: no bioimage.io id of Cellpose-SAM is known; the base model is
        described in ``config.cellpose_finetuning.base_model`` instead.
    format : {"standard", "wrapper"}
        ``standard`` (default): the network alone on 256 px tiles, with
        ``scale_range`` preprocessing and ``cellpose_flow_dynamics``
        postprocessing, weights as ``pytorch_state_dict``, ``torchscript``
        and ``onnx`` (see :mod:`.standard`). ``wrapper``: a
        ``model.py`` that runs all of cellpose's ``eval`` on whole images
        and outputs labels (``pytorch_state_dict`` only), for consumers
        without ``cellpose_flow_dynamics`` (bioimageio.core < 0.11).
    overwrite : bool
        Replace the contents of a non-empty ``out_dir``.

    Returns
    -------
    PackageResult
        Files written and the lineage (``training_dataset_id`` for the
        artifact manifest).

    Raises
    ------
    Conflict
        If the session is not completed or stopped.
    InvalidInput
        For bad arguments or a session without weights.
    ExportError
        If ``bioimageio.spec`` finds the package invalid (its messages), or
        the model finds no object in the sample image(s): the spec refuses
        an all-zero test output.
    """
    session = _open_session(session)
    status = _exportable_status(session)
    if checkpoint not in ("best", "last"):
        raise InvalidInput("checkpoint", f"must be 'best' or 'last', got {checkpoint!r}")
    if format not in ("standard", "wrapper"):
        raise InvalidInput("format", f"must be 'standard' or 'wrapper', got {format!r}")
    weights_path = session.weights(checkpoint)
    if not weights_path.is_file():
        raise InvalidInput("checkpoint", f"session {session.id!r} has no saved weights")
    infer_kwargs = _inference_kwargs(inference or InferenceSettings(), format)
    if parent_id is not None:
        _valid_model_id(parent_id)
    meta = {
        "authors": _authors(authors, session.owner),
        "uploader": _uploader(uploader),
        "cite": _citations(cite),
        "documentation": _documentation(documentation),
        "tags": list(dict.fromkeys([*DEFAULT_TAGS, *_tags(tags)])),
    }
    if format == "standard":
        meta["tags"] = list(dict.fromkeys([*meta["tags"], *STANDARD_TAGS]))
    candidates = _sample_candidates(session, sample_image)

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InvalidInput(str(out), "folder is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _build(
            session,
            status,
            out,
            checkpoint=checkpoint,
            weights_path=weights_path,
            model_name=model_name,
            description=description,
            meta=meta,
            license=license,
            candidates=candidates,
            infer_kwargs=infer_kwargs,
            parent_id=parent_id,
            format=format,
        )
    except BaseException:
        # Nothing half-written is left behind: the caller's folder is emptied again.
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def _build(
    session: Session,
    status: TrainingStatus,
    out: Path,
    *,
    checkpoint: str,
    weights_path: Path,
    model_name: str | None,
    description: str | None,
    meta: dict[str, Any],
    license: str | None,
    candidates: list[tuple[str, Any]],
    infer_kwargs: dict[str, Any],
    parent_id: str | None,
    format: PackageFormat,
) -> PackageResult:
    files = {name: out / name for name in CONTRACT_FILES}
    files[ENVIRONMENT_FILE] = out / ENVIRONMENT_FILE

    # Weights: our checkpoint minus its architecture entry, so strict loading works.
    state, arch = read_state_dict(weights_path)
    _write_weights(state, files["model_weights.pth"])
    n_params = int(sum(v.numel() for k, v in state.items() if k != "W2"))
    del state
    files["model.py"].write_text(model_source(format), encoding="utf-8")
    _write_environment(files[ENVIRONMENT_FILE])

    has_curves = session.curves_file.is_file() or bool(status.train_losses)
    if session.curves_file.is_file():
        shutil.copyfile(session.curves_file, out / CURVES_FILE)
    elif has_curves:
        from cellpose_finetuning.engine.plots import plot_training_curves

        plot_training_curves(status, out / CURVES_FILE)
    if has_curves:
        files[CURVES_FILE] = out / CURVES_FILE

    data = session.data
    base = _base_model(_start_model(session, status), arch)
    plan = _Plan(
        session_id=session.id,
        checkpoint=checkpoint,
        weights_file=weights_path.name,
        arch=arch,
        n_params=n_params,
        base=base,
        license=license or base["license"],
        name=model_name or _safe_name(f"Cellpose-SAM fine-tuned {session.id}"),
        description=description or "",
        authors=meta["authors"],
        tags=meta["tags"],
        parent_id=parent_id,
        dataset_id=data.dataset_artifact_id,
        n_train=len(data.train),
        n_test=len(data.test),
        sample_name="",
        sample_shape=(1, arch.bsize, arch.bsize),
        cropped=False,
        settings=_settings_for_export(status, session),
        status=status,
        metrics=_metrics(status),
        inference=infer_kwargs,
        has_curves=has_curves,
        timestamp=datetime.now(UTC).replace(microsecond=0).isoformat(),
        format=format,
        cite=meta["cite"],
        uploader=meta["uploader"],
        documentation=meta["documentation"],
    )

    if format == "wrapper":
        # The test output is what the exported model.py makes of the test input.
        architecture = {
            "source": "model.py",
            "callable": _WRAPPER_CALLABLE,
            "kwargs": {**_arch_kwargs(arch), **infer_kwargs},
        }
        model = _load_exported_model(out, architecture, "model_weights.pth")
        image, labels, sample_name, cropped = _segment_a_sample(model, candidates)
        del model
        np.save(files["input_sample.npy"], image[None])
        np.save(files["output_sample.npy"], labels)
    else:
        image, labels, sample_name, cropped, plan = _label_standard_sample(out, plan, candidates)
    plan = dataclasses.replace(
        plan,
        sample_name=sample_name,
        sample_shape=tuple(image.shape),
        cropped=cropped,
        # As the original service: a given description is added to the generated one.
        description=" ".join(
            x
            for x in (
                _default_description(arch, data, status, image.shape[0], format),
                description,
            )
            if x and x.strip()
        ),
    )
    _write_sample_tiffs(out, image, labels[0, 0], files)
    _write_cover(image, labels[0, 0], files["cover.png"])

    if format == "standard":
        # Converted from the finished pytorch_state_dict package, as bioimage.io's tools do.
        from cellpose_finetuning.export.bioimageio import standard as std

        _write_rdf(plan, out)
        plan = dataclasses.replace(plan, weights=std.convert_weights(out, ("torchscript", "onnx")))
        for entry in plan.weights.values():
            for name in (entry["source"], entry.get("external_data", {}).get("source")):
                if name:
                    files[name] = out / name

    _write_rdf(plan, out)
    errors, warnings = _validate(out)
    if errors:
        raise ExportError(f"bioimageio.spec rejected the package in {out}", errors)
    return PackageResult(
        path=out,
        files=files,
        name=plan.name,
        license=plan.license,
        session_id=session.id,
        checkpoint=checkpoint,
        weights_source=weights_path.name,
        base_model=base,
        parent_id=parent_id,
        training_dataset_id=plan.dataset_id,
        warnings=warnings,
        format=format,
    )


def model_source(format: PackageFormat) -> str:
    """The ``model.py`` of a package: the form's module with our imports inlined.

    :mod:`.network` (standard) imports the encoder builder from
    :mod:`cellpose_finetuning.engine.sam_encoder`, the one source the engine
    builds its networks with too, and :mod:`.wrapper` imports
    :mod:`.network`. A package must not need our package, so each import
    line marked ``# inlined on export`` is replaced by its module's text.
    """
    from importlib.resources import files

    text = files(__package__).joinpath(_MODEL_MODULES[format]).read_text(encoding="utf-8")
    inlined: set[str] = set()
    while match := _INLINED_IMPORT.search(text):
        module = match.group(1)
        if module in inlined:
            raise RuntimeError(f"{module} is inlined twice into model.py")
        inlined.add(module)
        package, _, name = module.rpartition(".")
        source = files(package).joinpath(f"{name}.py").read_text(encoding="utf-8")
        # Its docstring, ``from __future__`` line and ``__all__`` go: the template's stay.
        body = source.split(_FUTURE, 1)[1]
        body = "\n".join(line for line in body.splitlines() if not line.startswith("__all__"))
        block = f"# --- {module}, inlined by the export ---\n{body.strip()}\n# --- end of {module}"
        text = text[: match.start()] + block + text[match.end() :]
    return text


_FUTURE = "from __future__ import annotations\n"
_INLINED_IMPORT = re.compile(
    r"^from (cellpose_finetuning\.[\w.]+) import .*# inlined on export$", re.M
)


def _write_weights(state: Mapping[str, torch.Tensor], path: Path) -> None:
    import torch

    torch.save({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, path)


def _write_environment(path: Path) -> None:
    from importlib.metadata import version

    import torch

    torch_version = torch.__version__.split("+")[0]
    path.write_text(
        "name: cellpose-finetuned\n"
        "channels:\n"
        "  - conda-forge\n"
        "  - nodefaults\n"
        "dependencies:\n"
        "  - python>=3.10\n"
        "  - pip\n"
        "  - pip:\n"
        f"      - cellpose=={version('cellpose')}\n"
        f"      - torch>={torch_version}\n"
        # cellpose 4.0.x's eval breaks with numpy 2.4.
        "      - numpy<2.4\n",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------- zip / test
def zip_package(package_dir: str | os.PathLike[str], zip_path: str | os.PathLike[str]) -> Path:
    """Zip a package folder (files at the zip's root) and validate the zip.

    Weights and arrays are stored, text is deflated. The zip is written under
    a temporary name and renamed, so a reader never sees half of it.

    Raises
    ------
    ExportError
        If the zipped package does not validate.
    """
    package_dir, zip_path = Path(package_dir), Path(zip_path)
    if not (package_dir / "rdf.yaml").is_file():
        raise InvalidInput(str(package_dir), "not a package folder (no rdf.yaml)")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for path in sorted(p for p in package_dir.iterdir() if p.is_file()):
                if path.name.startswith("."):
                    continue
                stored = path.suffix in (".pth", ".npy", ".png")
                zf.write(
                    path,
                    arcname=path.name,
                    compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                )
        os.replace(tmp, zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    errors = validate_package(zip_path)
    if errors:
        raise ExportError(f"bioimageio.spec rejected {zip_path}", errors)
    return zip_path


# --------------------------------------------------------------------------- CLI
def export_command_impl(
    session_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    checkpoint: Literal["best", "last"] = "best",
    name: str | None = None,
    license: str | None = None,
    *,
    inference: InferenceSettings | None = None,
    run_test: bool = False,
    overwrite: bool = False,
    **metadata: Any,
) -> dict[str, Any]:
    """``cellpose-finetuning export SESSION_DIR --out model.zip``.

    ``out`` ending in ``.zip`` writes the package folder next to it
    (``<stem>/``) and the zip; anything else is the package folder.
    ``metadata`` goes to :func:`build_package` (``description``, ``authors``,
    ``uploader``, ``cite``, ``tags``, ``documentation``, ``format``).

    Returns
    -------
    dict
        :meth:`PackageResult.to_json`, plus ``test`` (the model test report)
        when ``run_test``.
    """
    out = Path(out)
    if out.suffix.lower() == ".zip":
        folder = out.with_suffix("")
        zip_path: Path | None = out
        if zip_path.exists() and not overwrite:
            raise InvalidInput(str(out), "file exists (use --overwrite to replace it)")
    else:
        folder, zip_path = out, None
    result = build_package(
        session_dir,
        folder,
        checkpoint=checkpoint,
        model_name=name,
        license=license,
        inference=inference,
        overwrite=overwrite,
        **metadata,
    )
    if zip_path is not None:
        zip_package(folder, zip_path)
    report = result.to_json()
    report["zip_path"] = str(zip_path) if zip_path else None
    if run_test:
        test = test_package(zip_path or folder)
        report["test"] = test.to_json()
        if not test.passed:
            raise ExportError("bioimageio.core's model test failed", test.errors)
    return report
