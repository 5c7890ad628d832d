"""What a package says about its session: arguments checked, lineage, license, metrics."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellpose_finetuning.engine.models import ArchSpec
from cellpose_finetuning.engine.schemas import InferenceSettings, TrainingStatus
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.errors import Conflict, InvalidInput
from cellpose_finetuning.export.bioimageio.common import (
    CITATIONS,
    CPSAM_BASE,
    DEFAULT_SCRATCH_LICENSE,
    EXPORTABLE_STATES,
)


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
