"""Constants, results and the plan shared by the export's modules."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellpose_finetuning.engine.models import ArchSpec
from cellpose_finetuning.engine.schemas import TrainingStatus
from cellpose_finetuning.errors import CellposeFinetuningError

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
_WRAPPER_CALLABLE = "CellposeSAMSegmenter"
#: The module of this package written as a package's ``model.py``, per form.
_MODEL_MODULES = {"standard": "network.py", "wrapper": "wrapper.py"}
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
