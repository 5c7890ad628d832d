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
  (:mod:`.bioimageio_network`) on 256 px tiles with an output halo;
  cellpose's normalisation is the spec's ``scale_range`` preprocessing and
  its flow dynamics the ``cellpose_flow_dynamics`` postprocessing; weights
  also as ``torchscript`` and ``onnx`` (:mod:`.bioimageio_standard`). The
  test tensors are a 256 px tile and what ``bioimageio.core`` makes of it.
- ``wrapper``: ``model.py`` runs cellpose's whole ``eval`` on raw images of
  any size and returns labels (:mod:`.bioimageio_model`), so the
  description lists no processing steps; for consumers without
  ``cellpose_flow_dynamics`` (bioimageio.core < 0.11).

The original service's export failed validation (extra top-level fields,
``parent`` as a string, ground truth as the test output, fixed image sizes,
no batch axis on test tensors). Here every package is validated with the
spec's own rules before :func:`build_package` returns, and an invalid one is
refused with the spec's messages. A failed export leaves no files behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cellpose_finetuning.engine.models import ArchSpec, read_state_dict
from cellpose_finetuning.engine.schemas import InferenceSettings, TrainingStatus
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import CellposeFinetuningError, Conflict, InvalidInput

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONTRACT_FILES",
    "ExportError",
    "ModelTestReport",
    "PackageResult",
    "build_package",
    "export_command_impl",
    "run_exported_model",
    "test_package",
    "validate_package",
    "zip_package",
]

log = logging.getLogger(__name__)

#: The files every package has, by the names the original service used.
CONTRACT_FILES = (
    "rdf.yaml",
    "model.py",
    "model_weights.pth",
    "input_sample.npy",
    "output_sample.npy",
    "cover.png",
    "doc.md",
)
ENVIRONMENT_FILE = "environment.yaml"
CURVES_FILE = "training_curves.png"
#: The test tensors as TIFF, for people and viewers (the spec's ``sample_tensor``).
SAMPLE_INPUT_FILE = "sample_input.tif"
SAMPLE_OUTPUT_FILE = "sample_output.tif"

#: Session states whose weights may be exported.
EXPORTABLE_STATES = frozenset({"completed", "stopped"})
#: The sample image is centre-cropped to at most this many pixels per side.
SAMPLE_MAX_SIDE = 512
#: Session images tried, in turn, for a sample the model finds objects in.
MAX_SAMPLE_TRIES = 5
#: Spatial axes accept any size from this up (cellpose pads and tiles internally).
MIN_SPATIAL_SIZE = 16
INPUT_ID = "input"
OUTPUT_ID = "labels"
#: Label images may differ in a few boundary pixels on other hardware.
MISMATCHED_PIXELS_PER_MILLION = 2000
COVER_MAX_HEIGHT = 400
COVER_MAX_BYTES = 500_000
_MODEL_TEMPLATE = Path(__file__).with_name("bioimageio_model.py")
_WRAPPER_CALLABLE = "CellposeSAMSegmenter"
_NETWORK_TEMPLATE = Path(__file__).with_name("bioimageio_network.py")
PackageFormat = Literal["standard", "wrapper"]

CITATIONS = (
    {
        "text": "Stringer, C., Wang, T., Michaelos, M. & Pachitariu, M. Cellpose: a generalist "
        "algorithm for cellular segmentation. Nature Methods 18, 100-106 (2021).",
        "doi": "10.1038/s41592-020-01018-x",
    },
    {
        "text": "Pachitariu, M., Rariden, M. & Stringer, C. Cellpose-SAM: superhuman "
        "generalization for cellular segmentation. bioRxiv (2025).",
        "doi": "10.1101/2025.04.28.651001",
    },
    {
        "text": "Kirillov, A. et al. Segment Anything. arXiv:2304.02643 (2023).",
        "doi": "10.48550/arXiv.2304.02643",
    },
)

#: Cellpose-SAM as a base model. The weights are MouseLand's, published on
#: Hugging Face; the model card's metadata says ``license: bsd-3-clause``. The
#: SAM ViT-L encoder they start from is Meta's, Apache-2.0. No bioimage.io
#: model id for these weights is known, so ``parent`` stays empty by default.
CPSAM_BASE = {
    "name": "Cellpose-SAM (cpsam)",
    "source": "https://huggingface.co/mouseland/cellpose-sam",
    "license": "BSD-3-Clause",
    "bioimageio_id": None,
    "notes": "Cellpose-SAM weights by MouseLand (HHMI Janelia), distributed on Hugging Face "
    "under BSD-3-Clause (model card metadata); the SAM ViT-L encoder they were initialised "
    "from is Meta's, Apache-2.0.",
}
#: License for networks not derived from pretrained weights (tiny/small presets).
DEFAULT_SCRATCH_LICENSE = "MIT"
DEFAULT_TAGS = (
    "cellpose",
    "cellpose-sam",
    "fine-tuned",
    "instance-segmentation",
    "2d",
    "pytorch",
)
STANDARD_TAGS = ("torchscript", "onnx")


class ExportError(CellposeFinetuningError):
    """A package could not be built, or the spec found it invalid.

    ``messages`` holds the spec's (or the model test's) own messages.
    """

    def __init__(self, summary: str, messages: Sequence[str] = ()) -> None:
        self.messages = list(messages)
        text = summary
        if self.messages:
            text += ":\n" + "\n".join(f"- {m}" for m in self.messages)
        super().__init__(text)


@dataclass(frozen=True)
class PackageResult:
    """What :func:`build_package` wrote and decided."""

    path: Path
    files: dict[str, Path]
    name: str
    license: str
    session_id: str
    checkpoint: str
    weights_source: str
    base_model: dict[str, Any]
    parent_id: str | None
    training_dataset_id: str | None
    warnings: list[str] = field(default_factory=list)
    format: str = "standard"

    @property
    def rdf(self) -> Path:
        """The ``rdf.yaml`` file."""
        return self.path / "rdf.yaml"

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (paths as strings)."""
        return {
            "path": str(self.path),
            "files": {k: str(v) for k, v in self.files.items()},
            "name": self.name,
            "license": self.license,
            "session_id": self.session_id,
            "checkpoint": self.checkpoint,
            "weights_source": self.weights_source,
            "base_model": self.base_model,
            "parent_id": self.parent_id,
            "training_dataset_id": self.training_dataset_id,
            "warnings": list(self.warnings),
            "format": self.format,
        }


@dataclass(frozen=True)
class ModelTestReport:
    """Outcome of ``bioimageio.core``'s model test."""

    __test__ = False  # not a pytest test class

    passed: bool
    status: str
    errors: list[str]
    warnings: list[str]
    tests: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "passed": self.passed,
            "status": self.status,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "tests": list(self.tests),
        }


# --------------------------------------------------------------------------- validation
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


# --------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_session(session: Session | str | os.PathLike[str]) -> Session:
    if isinstance(session, Session):
        return session
    path = Path(session)
    if not (path / "status.json").is_file():
        raise InvalidInput(str(path), "not a training session folder (no status.json)")
    return Session(path)


def _exportable_status(session: Session) -> TrainingStatus:
    status = session.read_status()
    if status.status_type not in EXPORTABLE_STATES:
        hint = {
            "waiting": "it has not started",
            "preparing": "it is still preparing; wait until it completes or stop it",
            "running": "it is still training; wait until it completes or stop it",
            "failed": "it failed; continue the session to finish training first",
        }.get(status.status_type, "")
        raise Conflict(
            f"session {session.id!r} is {status.status_type}: only completed or stopped "
            f"sessions can be exported ({hint})"
        )
    return status


def _arch_kwargs(arch: ArchSpec) -> dict[str, Any]:
    return {
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "global_attn_indexes": list(arch.global_attn_indexes),
        "ps": arch.ps,
        "bsize": arch.bsize,
        "nout": arch.nout,
    }


def _inference_kwargs(settings: InferenceSettings, format: str = "wrapper") -> dict[str, Any]:
    if settings.do_3D or settings.stitch_threshold > 0:
        raise InvalidInput(
            "inference", "the exported model is 2D: do_3D/stitch_threshold unsupported"
        )
    if format == "standard" and settings.diameter is not None:
        raise InvalidInput(
            "diameter",
            "the standard form runs the network at the image's own scale (bioimage.io has no "
            "resizing step); export without diameter, resize images before use, or use "
            "format='wrapper'",
        )
    if format == "standard" and settings.niter not in (None, 0, 200):
        raise InvalidInput(
            "niter",
            "cellpose_flow_dynamics runs cellpose's default 200 iterations; export without "
            "niter or use format='wrapper'",
        )
    return {
        "diameter": settings.diameter,
        "flow_threshold": settings.flow_threshold,
        "cellprob_threshold": settings.cellprob_threshold,
        "min_size": settings.min_size,
        "niter": settings.niter,
        "tile_overlap": settings.tile_overlap,
        "batch_size": settings.batch_size,
    }


def _base_model(model: str, arch: ArchSpec) -> dict[str, Any]:
    """Describe the model training started from, and the license that follows."""
    if model == "cpsam":
        return dict(CPSAM_BASE)
    name = Path(model).name
    if arch.is_cpsam:
        # A cpsam-shaped checkpoint (e.g. an earlier fine-tuning run) derives from cpsam.
        return {
            **CPSAM_BASE,
            "name": f"checkpoint {name} (Cellpose-SAM architecture)",
            "source": name,
            "notes": "A Cellpose-SAM-shaped checkpoint, assumed derived from the Cellpose-SAM "
            "weights. " + CPSAM_BASE["notes"],
        }
    return {
        "name": f"checkpoint {name} ({arch.name} architecture)",
        "source": name,
        "license": DEFAULT_SCRATCH_LICENSE,
        "bioimageio_id": None,
        "notes": f"A {arch.name!r} network of cellpose's Transformer class with a reduced SAM "
        "encoder, not initialised from pretrained weights.",
    }


def _center_crop(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[-2:]
    top, left = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
    return image[..., top : top + min(h, max_side), left : left + min(w, max_side)]


def _prepare_sample(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(C, H, W) float32 with at most 3 channels, centre-cropped; and whether it was cropped."""
    if image.ndim != 3:
        raise InvalidInput("sample_image", f"must be a 2D image, got shape {image.shape}")
    cropped = max(image.shape[-2:]) > SAMPLE_MAX_SIDE
    image = _center_crop(image[:3], SAMPLE_MAX_SIDE)
    return np.ascontiguousarray(image, dtype=np.float32), cropped


def _sample_candidates(
    session: Session, sample_image: str | os.PathLike[str] | np.ndarray | None
) -> list[tuple[str, Any]]:
    """(name, image or path) to try as the sample: the given one, else test then train images."""
    if isinstance(sample_image, np.ndarray):
        return [("sample_image", sample_image)]
    if sample_image is not None:
        return [(Path(sample_image).name, sample_image)]
    data = session.data
    candidates = [(f"{Path(i).name} (test set)", i) for i, _ in data.test]
    candidates += [(f"{Path(i).name} (training set)", i) for i, _ in data.train]
    if not candidates:
        raise InvalidInput("sample_image", "the session has no images; pass sample_image")
    return candidates[:MAX_SAMPLE_TRIES]


def _segment_a_sample(
    model: Any, candidates: list[tuple[str, Any]]
) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """The first candidate the model finds objects in: (image, labels, name, cropped).

    The spec refuses an all-zero test output ("too small for reliable
    testing"), so a sample without any object cannot make a valid package.
    """
    from cellpose_finetuning.io.images import read_image, to_canonical

    tried = []
    for name, source in candidates:
        if isinstance(source, np.ndarray):
            raw = to_canonical(source, name="sample_image")
        else:
            raw = read_image(source)
        image, cropped = _prepare_sample(raw)
        labels = _run_model(model, image[None])
        if labels.max() > 0:
            return image, labels, name, cropped
        tried.append(name)
    raise _no_objects_error(tried, getattr(model, "eval_kwargs", {}))


def _load_wrapper_module(model_py: Path) -> Any:
    """Import the package's own ``model.py`` (not our copy) under a unique name."""
    name = f"_cpft_export_{_sha256(model_py)[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, model_py)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_exported_model(
    package_dir: Path, architecture: Mapping[str, Any], weights_file: str
) -> Any:
    """Instantiate the package's architecture and load its weights strictly (as bioimageio.core)."""
    import torch

    module = _load_wrapper_module(package_dir / architecture["source"])
    model = getattr(module, architecture["callable"])(**architecture.get("kwargs", {}))
    state = torch.load(package_dir / weights_file, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _run_model(model: Any, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    return out.cpu().numpy().astype(np.int32, copy=False)


def run_exported_model(package_dir: str | os.PathLike[str], image: np.ndarray) -> np.ndarray:
    """Run a package's ``model.py`` + ``model_weights.pth`` on a (B, C, H, W) batch.

    Reads the architecture kwargs from ``rdf.yaml`` and loads the weights
    with strict key checking, as ``bioimageio.core`` does.

    Returns
    -------
    numpy.ndarray
        (B, 1, H, W) int32 labels.
    """
    import yaml

    package_dir = Path(package_dir)
    weights = yaml.safe_load((package_dir / "rdf.yaml").read_text())["weights"]
    entry = weights["pytorch_state_dict"]
    model = _load_exported_model(package_dir, entry["architecture"], entry["source"])
    return _run_model(model, image)


def _write_weights(state: Mapping[str, torch.Tensor], path: Path) -> None:
    import torch

    torch.save({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, path)


def _write_cover(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Input beside its segmentation (2:1 for square images), at most 400 px high."""
    from PIL import Image

    from cellpose_finetuning.engine.plots import normalize_for_display, overlay_masks

    left = (normalize_for_display(image) * 255).round().astype("uint8")
    right = overlay_masks(image, labels)
    gap = np.full((left.shape[0], max(2, left.shape[1] // 64), 3), 255, "uint8")
    picture = Image.fromarray(np.concatenate([left, gap, right], axis=1))
    if picture.height > COVER_MAX_HEIGHT:
        scale = COVER_MAX_HEIGHT / picture.height
        picture = picture.resize(
            (max(1, round(picture.width * scale)), COVER_MAX_HEIGHT), Image.Resampling.LANCZOS
        )
    picture.save(path, optimize=True)
    if path.stat().st_size > COVER_MAX_BYTES:
        # The spec asks for covers under 500 kB; a 256-colour palette keeps the look.
        picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _write_sample_tiffs(
    out: Path, image: np.ndarray, labels: np.ndarray, files: dict[str, Path]
) -> None:
    import tifffile

    files[SAMPLE_INPUT_FILE] = out / SAMPLE_INPUT_FILE
    files[SAMPLE_OUTPUT_FILE] = out / SAMPLE_OUTPUT_FILE
    tifffile.imwrite(files[SAMPLE_INPUT_FILE], image.astype(np.float32))
    tifffile.imwrite(files[SAMPLE_OUTPUT_FILE], labels.astype(np.int32))


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


def _safe_name(text: str) -> str:
    """Keep only the characters the spec allows in a model name."""
    cleaned = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", text)
    return re.sub(r"-{2,}", "-", cleaned).strip(" -")[:64]


def _authors(authors: Sequence[str | Mapping[str, Any]] | None, owner: str | None) -> list[dict]:
    if not authors:
        name = owner if owner and "/" not in owner and "\\" not in owner else None
        return [{"name": name or "cellpose-finetuning"}]
    out = []
    for i, a in enumerate(authors):
        if not isinstance(a, str | Mapping):
            raise InvalidInput(f"authors[{i}]", "must be a name or an object with 'name'")
        entry = {"name": a} if isinstance(a, str) else dict(a)
        if not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise InvalidInput(f"authors[{i}]", f"needs a non-empty name, got {a!r}")
        out.append({k: str(entry[k]).strip() for k in _AUTHOR_KEYS if entry.get(k)})
    return out


_AUTHOR_KEYS = ("name", "affiliation", "email", "github_user", "orcid")


def _uploader(uploader: Mapping[str, Any] | None) -> dict[str, str] | None:
    if uploader is None:
        return None
    if not isinstance(uploader, Mapping):
        raise InvalidInput("uploader", "must be an object with 'name' and 'email'")
    out = {}
    for key in ("name", "email"):
        value = uploader.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput("uploader", f"{key!r} must be a non-empty string")
        out[key] = value.strip()
    return out


def _citations(cite: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """cellpose's, Cellpose-SAM's and SAM's citations, then the caller's (by doi/url once)."""
    out = [dict(c) for c in CITATIONS]
    for i, entry in enumerate(cite or ()):
        if isinstance(entry, str):
            entry = {"text": entry, "url": entry} if entry.startswith("http") else None
        if not isinstance(entry, Mapping) or not str(entry.get("text", "")).strip():
            raise InvalidInput(f"cite[{i}]", "needs 'text' and a 'doi' or 'url'")
        if not (entry.get("doi") or entry.get("url")):
            raise InvalidInput(f"cite[{i}]", "needs a 'doi' or 'url'")
        item = {k: str(entry[k]).strip() for k in ("text", "doi", "url") if entry.get(k)}
        if not any(
            (item.get("doi") and c.get("doi") == item["doi"])
            or (item.get("url") and c.get("url") == item["url"])
            for c in out
        ):
            out.append(item)
    return out


def _tags(tags: Sequence[str] | None) -> list[str]:
    out = []
    for tag in tags or ():
        if not isinstance(tag, str) or not tag.strip():
            raise InvalidInput("tags", f"tags must be non-empty strings, got {tag!r}")
        out.append(tag.strip().lower())
    return out


def _documentation(documentation: str | os.PathLike[str] | None) -> str | None:
    """Markdown: a ``str`` is the text itself, a path (``os.PathLike``) a file to read.

    A string is never opened as a file, so a service passing a caller's text
    cannot be made to publish a file of the server.
    """
    if documentation is None:
        return None
    if isinstance(documentation, os.PathLike):
        path = Path(documentation)
        if not path.is_file():
            raise InvalidInput("documentation", f"no such file: {path}")
        return path.read_text(encoding="utf-8")
    if not isinstance(documentation, str):
        raise InvalidInput("documentation", "must be markdown text or a file path")
    return documentation.strip() or None


def _valid_dataset_id(dataset_id: str | None) -> bool:
    if not dataset_id:
        return False
    from bioimageio.spec.dataset.v0_3 import DatasetId

    try:
        DatasetId(dataset_id)
    except Exception:
        return False
    return True


def _valid_model_id(model_id: str) -> None:
    from bioimageio.spec.model.v0_5 import ModelId

    try:
        ModelId(model_id)
    except Exception as exc:
        raise InvalidInput(
            "parent_id", f"{model_id!r} is not a valid bioimage.io id ({exc})"
        ) from exc


def _metrics(status: TrainingStatus) -> dict[str, Any]:
    out: dict[str, Any] = {
        "epochs_run": len(status.train_losses),
        "final_train_loss": status.train_losses[-1] if status.train_losses else None,
        "best_epoch": status.best_epoch,
    }
    tests = [(i + 1, v) for i, v in enumerate(status.test_losses) if v is not None]
    if tests:
        best = min(tests, key=lambda t: t[1])
        out["best_test_loss"] = best[1]
        out["best_test_loss_epoch"] = best[0]
        out["final_test_loss"] = tests[-1][1]
    pixel = [(i + 1, m) for i, m in enumerate(status.test_metrics) if m is not None]
    if pixel:
        epoch, m = pixel[-1]
        out["pixel_metrics_epoch"] = epoch
        out["pixel_metrics"] = m.model_dump()
    if status.instance_metrics is not None:
        out["instance_metrics"] = status.instance_metrics.model_dump()
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _start_model(session: Session, status: TrainingStatus) -> str:
    """The ``model`` the session started from: ``cpsam`` or a checkpoint path."""
    try:
        return str(session.settings.model)
    except (OSError, ValueError):
        return str(status.model)


def _settings_for_export(status: TrainingStatus, session: Session) -> dict[str, Any]:
    try:
        settings = session.settings.model_dump(mode="json")
    except (OSError, ValueError):
        settings = dict(status.settings)
    settings.pop("device", None)
    if settings.get("model") and settings["model"] not in ("cpsam",):
        settings["model"] = Path(str(settings["model"])).name
    return settings


# --------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    """Everything decided about one package before its files are written."""

    session_id: str
    checkpoint: str
    weights_file: str
    arch: ArchSpec
    n_params: int
    base: dict[str, Any]
    license: str
    name: str
    description: str
    authors: list[dict[str, Any]]
    tags: list[str]
    parent_id: str | None
    dataset_id: str | None
    n_train: int
    n_test: int
    sample_name: str
    sample_shape: tuple[int, ...]
    cropped: bool
    settings: dict[str, Any]
    status: TrainingStatus
    metrics: dict[str, Any]
    inference: dict[str, Any]
    has_curves: bool
    timestamp: str
    format: str = "standard"
    cite: list[dict[str, Any]] = field(default_factory=lambda: [dict(c) for c in CITATIONS])
    uploader: dict[str, str] | None = None
    documentation: str | None = None
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        return self.sample_shape[0]


def _file(name: str) -> dict[str, Any]:
    """A file entry; its sha256 is filled in by :func:`_fill_hashes`."""
    return {"source": name, "sha256": None}


def _fill_hashes(node: Any, root: Path) -> None:
    """Set every ``sha256: None`` next to a local ``source`` to the file's hash."""
    if isinstance(node, dict):
        if node.get("sha256", 0) is None and isinstance(node.get("source"), str):
            node["sha256"] = _sha256(root / node["source"])
        for value in node.values():
            _fill_hashes(value, root)
    elif isinstance(node, list):
        for value in node:
            _fill_hashes(value, root)


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

    from cellpose_finetuning.export import bioimageio_standard as std

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


# --------------------------------------------------------------------------- doc.md
def _doc(plan: _Plan) -> str:
    m, s, base, arch, kw = plan.metrics, plan.settings, plan.base, plan.arch, plan.inference
    resize = (
        f"the image is resized by 30 / {_fmt(kw['diameter'])} (diameter)"
        if kw["diameter"]
        else "no resizing (diameter = None)"
    )
    lines = [
        f"# {plan.name}",
        "",
        plan.description,
        "",
        "## Base model",
        "",
        f"- **Started from:** {base['name']} — {base['source']}",
        f"- **Architecture:** cellpose `Transformer` with a SAM ViT encoder (preset "
        f"`{arch.name}`: embed_dim {arch.embed_dim}, depth {arch.depth}, heads "
        f"{arch.num_heads}), {plan.n_params:,} parameters",
        f"- **Checkpoint exported:** `{plan.checkpoint}` (`{plan.weights_file}`) of training "
        f"session `{plan.session_id}`",
        "",
        "## Training data",
        "",
        f"- **Training images:** {plan.n_train}",
        f"- **Test (validation) images:** {plan.n_test}",
        f"- **Dataset:** {plan.dataset_id or 'local files (no dataset id)'}",
        f"- **Sample image in this package:** {plan.sample_name}"
        + (
            f", centre-cropped to {plan.sample_shape[-2]}×{plan.sample_shape[-1]}"
            if plan.cropped
            else ""
        ),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in s.items()],
        f"| epochs run | {_fmt(m.get('epochs_run'))} |",
        f"| training time (s) | {_fmt(plan.status.elapsed_seconds)} |",
        "",
        "Training used cellpose 4's own recipe: flows computed from the masks, per-channel "
        "1–99 percentile normalisation, random rotation/flip/scale augmentation on "
        f"{arch.bsize}×{arch.bsize} tiles, cellpose's loss (flow MSE + cell-probability BCE) "
        "and AdamW.",
        "",
    ]
    if plan.has_curves:
        lines += ["![Training curves](training_curves.png)", ""]
    lines += [
        "## Validation",
        "",
        "Metrics recorded during training on the session's test images (pixel metrics: "
        "predicted foreground = cell probability > 0; AP = TP / (TP + FP + FN) after full "
        "cellpose inference, at IoU 0.5/0.75/0.9).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| final train loss | {_fmt(m.get('final_train_loss'))} |",
        f"| best test loss (epoch) | {_fmt(m.get('best_test_loss'))} "
        f"({_fmt(m.get('best_test_loss_epoch'))}) |",
        f"| final test loss | {_fmt(m.get('final_test_loss'))} |",
    ]
    px, im = m.get("pixel_metrics"), m.get("instance_metrics")
    if px:
        lines.append(
            f"| pixel F1 / IoU (epoch {m['pixel_metrics_epoch']}) | "
            f"{_fmt(px['f1'])} / {_fmt(px['iou'])} |"
        )
    if im:
        lines += [
            f"| AP@0.5 / AP@0.75 / AP@0.9 | {_fmt(im['ap_0_5'])} / {_fmt(im['ap_0_75'])} / "
            f"{_fmt(im['ap_0_9'])} |",
            f"| objects true / predicted | {im['n_true']} / {im['n_pred']} |",
        ]
    if not (px or im or m.get("best_test_loss") is not None):
        lines.append("| test metrics | none recorded (no test images) |")
    lines += [
        "",
        "To validate on your own data, segment annotated images that were not used for "
        "training and compare with `cellpose.metrics.average_precision`.",
        "",
    ]
    lines += (
        _doc_standard_usage(plan)
        if plan.format == "standard"
        else [
            "## Input and output",
            "",
            f"- **Input `{INPUT_ID}`:** `(batch, channel, y, x)` float32, **raw** intensities "
            f"(any range), {plan.n_channels} channel(s), any height and width "
            f"≥ {MIN_SPATIAL_SIZE} px. Do not normalise: the model does it.",
            f"- **Output `{OUTPUT_ID}`:** `(batch, channel=1, y, x)` int32 instance labels, "
            "0 = background, same height and width as the input.",
            "",
            "## Pre- and post-processing (inside the model)",
            "",
            "`model.py` runs cellpose's complete `CellposeModel.eval`, so the rdf lists no "
            "separate processing steps:",
            "",
            "1. each channel is rescaled so that its 1st and 99th percentiles map to 0 and 1 "
            "(cellpose `normalize99`, per image); fewer than 3 channels are zero-padded, more "
            "are cut to the first 3;",
            f"2. {resize};",
            f"3. the network runs on overlapping {arch.bsize}×{arch.bsize} tiles (overlap "
            f"{kw['tile_overlap']}), so images of any size work; run it on whole images, not "
            "on tiles cut by the caller (labels would not match across tiles);",
            f"4. cellpose flow dynamics ({kw['niter'] or 200} steps) turn flows and cell "
            f"probability into masks: cell probability threshold {kw['cellprob_threshold']}, "
            f"flow error threshold {kw['flow_threshold']}, objects smaller than "
            f"{kw['min_size']} px removed.",
            "",
            "## How to use",
            "",
            "With bioimageio.core (in the environment of `environment.yaml`):",
            "",
            "```python",
            "import numpy as np",
            "from bioimageio.core import load_model_description, predict",
            "",
            'model = load_model_description("model.zip")',
            f'image = np.load("input_sample.npy")  # (1, {plan.n_channels}, H, W) float32, raw',
            f'labels = predict(model=model, inputs={{"{INPUT_ID}": image}})'
            f'.members["{OUTPUT_ID}"].data',
            "```",
            "",
            "Or in plain Python, from the unpacked files:",
            "",
            "```python",
            "import numpy as np, torch, yaml",
            "from model import CellposeSAMSegmenter",
            "",
            'rdf = yaml.safe_load(open("rdf.yaml"))',
            'net = CellposeSAMSegmenter(**rdf["weights"]["pytorch_state_dict"]["architecture"]'
            '["kwargs"])',
            'net.load_state_dict(torch.load("model_weights.pth", weights_only=True))',
            'labels = net.eval().segment(np.load("input_sample.npy")[0])  # (H, W) int32',
            "```",
        ]
    )
    if arch.is_cpsam:
        lines += [
            "",
            "`model_weights.pth` is a plain cellpose state dict, so cellpose itself can use "
            "it: `cellpose.models.CellposeModel(pretrained_model='model_weights.pth')`.",
        ]
    lines += [
        "",
        "## Limitations",
        "",
        f"- Fine-tuned on {plan.n_train} image(s): expect it to work on images like those, "
        "not in general. Check results by eye before relying on them.",
        "- 2D only (run 3D stacks plane by plane).",
        "- Label numbers are arbitrary; on other hardware a few boundary pixels may differ.",
        "",
        "## License",
        "",
        f"These weights are released under **{plan.license}**. {base['notes']} "
        "cellpose's code is BSD-3-Clause (HHMI); `model.py` imports it. Check that the "
        "license of the training images allows sharing a model trained on them.",
        "",
        "## Citation",
        "",
        *[
            f"- {c['text']} " + (f"doi:{c['doi']}" if c.get("doi") else c.get("url", ""))
            for c in plan.cite
        ],
        "",
        f"Exported by cellpose-finetuning {_package_version()} on {plan.timestamp}.",
        "",
    ]
    if plan.documentation:
        lines = [plan.documentation.rstrip(), "", "---", "", *lines]
    return "\n".join(lines)


def _doc_standard_usage(plan: _Plan) -> list[str]:
    """Input, output, processing and usage of a standard-form package."""
    from cellpose_finetuning.export import bioimageio_standard as std

    kw, bsize = plan.inference, plan.arch.bsize
    low, high = std.PERCENTILES
    formats = ", ".join(f"`{f}`" for f in ("pytorch_state_dict", *plan.weights))
    return [
        "## Input and output",
        "",
        f"- **Input `{INPUT_ID}`:** `(batch, channel, y, x)` float32 tiles of exactly "
        f"{bsize}×{bsize} px, **raw** intensities (any range), {plan.n_channels} channel(s).",
        f"- **Output `{OUTPUT_ID}`:** `(batch, channel=1, y, x)` {std.LABELS_DTYPE} instance "
        f"labels, 0 = background; the output declares a halo of {std.HALO} px per side.",
        f"- **Weights:** {formats} (the converted ones name `pytorch_state_dict` as parent).",
        "",
        "## Pre- and post-processing (bioimage.io steps)",
        "",
        "The package holds only Cellpose-SAM's network; the rest of cellpose's pipeline is "
        "described with the spec's own steps:",
        "",
        f"1. `scale_range` (preprocessing): each channel of each image is rescaled so its "
        f"{low:g}th and {high:g}th percentiles map to 0 and 1 (cellpose `normalize99`); "
        "missing channels are filled with zeros inside the network, as cellpose does;",
        f"2. the network gives Y flow, X flow and cell probability for each {bsize} px tile; "
        f"consumers tile larger images with the {std.HALO} px halo (bioimage.io pads the "
        f"image border with `{std.PAD_MODE}`); pad images smaller than {bsize} px first;",
        "3. `cellpose_flow_dynamics` (postprocessing, bioimageio.core ≥ 0.11 with cellpose "
        f"installed): 200 steps of flow dynamics; cell probability threshold "
        f"{kw['cellprob_threshold']}, flow error threshold {kw['flow_threshold']}, objects "
        f"smaller than {kw['min_size']} px removed.",
        "",
        "Differences from `cellpose` itself: cellpose blends overlapping tiles and pads the "
        "border with zeros after normalising, so masks can differ near tile seams and the "
        "image border; images are used at their own scale (no diameter resizing).",
        "",
        "## How to use",
        "",
        "With bioimageio.core ≥ 0.11 (in the environment of `environment.yaml`):",
        "",
        "```python",
        "import numpy as np",
        "from bioimageio.core import create_prediction_pipeline, load_model_description, predict",
        "",
        'model = load_model_description("model.zip")',
        f"image = ...  # (1, {plan.n_channels}, H, W) float32, raw; H, W >= {bsize}",
        "labels = predict(",
        "    model=create_prediction_pipeline(model),",
        f'    inputs={{"{INPUT_ID}": image}},',
        "    blocksize_parameter=0,  # tile it",
        f').members["{OUTPUT_ID}"].data',
        "```",
        "",
        "`model_weights.pth` is a plain cellpose state dict of the network: "
        "`cellpose-finetuning infer --model model.zip` segments with cellpose's own `eval`.",
    ]


# --------------------------------------------------------------------------- build
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
        and ``onnx`` (see :mod:`.bioimageio_standard`). ``wrapper``: a
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
    template = _NETWORK_TEMPLATE if format == "standard" else _MODEL_TEMPLATE
    shutil.copyfile(template, files["model.py"])
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
        from cellpose_finetuning.export import bioimageio_standard as std

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


def _write_rdf(plan: _Plan, out: Path) -> None:
    """Write ``doc.md`` and ``rdf.yaml`` (with the hashes of every file it names)."""
    rdf = _rdf(plan)
    (out / "doc.md").write_text(_doc(plan), encoding="utf-8")
    _fill_hashes(rdf, out)
    _write_yaml(rdf, out / "rdf.yaml")


def _label_standard_sample(
    out: Path, plan: _Plan, candidates: list[tuple[str, Any]]
) -> tuple[np.ndarray, np.ndarray, str, bool, _Plan]:
    """The first candidate tile the package finds objects in, labelled by running the package.

    Each candidate is cut to one network tile and written as the test input;
    ``bioimageio.core`` then runs the package on it exactly as its model test
    will, and that is the test output.
    """
    from cellpose_finetuning.export import bioimageio_standard as std
    from cellpose_finetuning.io.images import read_image, to_canonical

    tried = []
    placeholder = None
    for name, source in candidates:
        raw = to_canonical(source, name="sample_image") if isinstance(source, np.ndarray) else None
        raw = raw if raw is not None else read_image(source)
        if raw.ndim != 3:
            raise InvalidInput("sample_image", f"must be a 2D image, got shape {raw.shape}")
        image, cropped = std.fit_to_tile(raw[:3], plan.arch.bsize)
        plan = dataclasses.replace(plan, sample_shape=tuple(image.shape), sample_name=name)
        np.save(out / "input_sample.npy", image[None])
        if placeholder is None:
            # Replaced below; the package is loaded without IO checks to make the real one.
            placeholder = np.ones((1, 1, *image.shape[-2:]), std.LABELS_DTYPE)
        np.save(out / "output_sample.npy", placeholder)
        _write_sample_tiffs(out, image, placeholder[0, 0], {})
        _write_cover(image, placeholder[0, 0], out / "cover.png")
        _write_rdf(plan, out)
        labels = std.run_package_on_test_input(out)
        if labels.max() > 0:
            np.save(out / "output_sample.npy", labels)
            return image, labels, name, cropped, plan
        tried.append(name)
    raise _no_objects_error(tried, plan.inference)


def _no_objects_error(tried: list[str], inference: Mapping[str, Any]) -> ExportError:
    """Which images were tried and what to change: bioimage.io refuses an empty test output."""
    return ExportError(
        f"the model finds no objects in the sample image(s) {', '.join(tried)}, and "
        "bioimage.io needs a test output with objects: train longer, lower "
        f"cellprob_threshold (now {inference.get('cellprob_threshold')}) or flow_threshold "
        f"(now {inference.get('flow_threshold')}), or pass a sample_image with objects the "
        "model finds",
        [f"no objects in {n}" for n in tried],
    )


def _default_description(
    arch: ArchSpec, data: Any, status: TrainingStatus, n_channels: int, format: str = "wrapper"
) -> str:
    dataset = f" of dataset {data.dataset_artifact_id}" if data.dataset_artifact_id else ""
    if format == "standard":
        return (
            f"Cellpose-SAM ({arch.name} network) fine-tuned on {len(data.train)} training "
            f"image(s){dataset} for {len(status.train_losses)} epoch(s). Input: raw 2D image "
            f"tiles, {n_channels} channel(s), {arch.bsize} px (tile larger images with the "
            "halo); output: instance labels from cellpose's flow dynamics."
        )
    return (
        f"Cellpose-SAM ({arch.name} network) fine-tuned on {len(data.train)} training "
        f"image(s){dataset} for {len(status.train_losses)} epoch(s). Input: raw 2D images, "
        f"{n_channels} channel(s), any size; output: instance labels. Normalisation, tiling "
        "and flow dynamics run inside the model (cellpose 4 eval)."
    )


def _training_details(settings: Mapping[str, Any], status: TrainingStatus) -> dict[str, Any]:
    lr = settings.get("learning_rate")
    wd = settings.get("weight_decay")
    return {
        "training_preprocessing": "cellpose: flows from masks; per-channel 1-99 percentile "
        "normalisation; random rotation, flip and scale (0.75-1.25) on 256 px tiles",
        "training_epochs": float(len(status.train_losses)),
        "training_batch_size": float(settings.get("batch_size") or 1),
        "initial_learning_rate": float(lr) if lr is not None else None,
        "learning_rate_schedule": f"{settings.get('lr_schedule', 'proportional')}: linear "
        "warm-up, then constant (halved at the end of runs over 99 epochs)",
        "loss_function": "cellpose.train._loss_fn_seg",
        "optimizer": "torch.optim.AdamW",
        "optimizer_kwargs": {"lr": lr, "weight_decay": wd},
        "regularization": f"weight decay {wd}",
        "training_duration": (status.elapsed_seconds or 0.0) / 3600.0,
    }


def _write_yaml(data: Mapping[str, Any], path: Path) -> None:
    import yaml

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=100),
        encoding="utf-8",
    )
    os.replace(tmp, path)


def _package_version() -> str:
    from cellpose_finetuning import __version__

    return __version__


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


def package_predictor(source: str | os.PathLike[str]) -> Any:
    """A predictor for :mod:`cellpose_finetuning.engine.evaluation` from an exported package.

    The package's own ``model.py`` and ``model_weights.pth`` run with the
    thresholds baked into it, exactly as a BioImage.IO consumer runs them.

    Parameters
    ----------
    source : path-like
        A package folder (with ``rdf.yaml``) or its ``.zip``.

    Returns
    -------
    callable
        ``(C, H, W)`` image -> ``(H, W)`` int32 labels.
    """
    import tempfile
    import zipfile

    import yaml

    path = Path(source)
    if path.is_file() and zipfile.is_zipfile(path):
        tmp = tempfile.TemporaryDirectory(prefix="cpft-package-")
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if Path(member).is_absolute() or ".." in Path(member).parts:
                    raise InvalidInput(str(path), f"unsafe path in the zip: {member!r}")
            zf.extractall(tmp.name)
        root = Path(tmp.name)
        rdfs = sorted(root.rglob("rdf.yaml")) or sorted(root.rglob("*.bioimageio.yaml"))
        if not rdfs:
            raise InvalidInput(str(path), "no rdf.yaml in the package")
        package_dir = rdfs[0].parent
    elif (path / "rdf.yaml").is_file():
        tmp, package_dir = None, path
    else:
        raise InvalidInput(str(path), "not a package folder (rdf.yaml) or a package .zip")
    entry = yaml.safe_load((package_dir / "rdf.yaml").read_text())["weights"]
    entry = entry["pytorch_state_dict"]
    model = _load_exported_model(package_dir, entry["architecture"], entry["source"])

    def predict(image: np.ndarray, _keep: Any = tmp) -> np.ndarray:
        return _run_model(model, np.asarray(image, dtype="float32")[None])[0, 0]

    return predict
