"""Did fine-tuning help? Score several models on the same labelled images.

Every model segments every image with the same inference settings (the
path ``infer`` takes: :func:`cellpose_finetuning.engine.inference.segment_auto`,
one pass or block-wise)
and is scored with :func:`cellpose_finetuning.engine.metrics.score_masks`
(cellpose's own matching). The training runner uses the same two steps for
its ``base_instance_metrics`` (before epoch 1) and ``instance_metrics`` (at
the end), so a report and a status agree on the same data.

A model is anything that turns a (C, H, W) image into labels (a
*predictor*): pretrained names, checkpoint files and sessions are loaded
here; exported BioImage.IO packages are run by
:func:`cellpose_finetuning.export.bioimageio.package_predictor`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from cellpose_finetuning.engine.metrics import ImageScore, score_masks
from cellpose_finetuning.engine.schemas import InferenceSettings, InstanceMetrics
from cellpose_finetuning.errors import InvalidInput

__all__ = [
    "EvaluationReport",
    "Labelled",
    "ModelScore",
    "Predictor",
    "checkpoint_predictor",
    "evaluate_predictors",
    "load_labelled",
    "report_pictures",
    "score_predictions",
    "write_report",
]

#: A model as the evaluation sees it: (C, H, W) image in, (H, W) labels out.
Predictor = Callable[[np.ndarray], np.ndarray]
#: One labelled image: (name, (C, H, W) image, (H, W) labels).
Labelled = tuple[str, np.ndarray, np.ndarray]


class ModelScore(BaseModel):
    """One model's scores: the set's metrics and one row per image."""

    model: str
    metrics: InstanceMetrics
    images: list[ImageScore]
    seconds: float


class EvaluationReport(BaseModel):
    """Several models scored on the same images with the same settings."""

    images: list[str]
    models: list[ModelScore]
    inference: dict[str, Any]

    def to_markdown(self) -> str:
        """A mean table (one row per model) and a per-image AP@0.5 table."""
        lines = [
            "| model | AP@0.5 | AP@0.75 | AP@0.9 | precision@0.5 | recall@0.5 | F1@0.5 "
            "| true | predicted |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in self.models:
            x = m.metrics
            lines.append(
                f"| {m.model} | {x.ap_0_5:.3f} | {x.ap_0_75:.3f} | {x.ap_0_9:.3f} "
                f"| {x.precision_0_5:.3f} | {x.recall_0_5:.3f} | {x.f1_0_5:.3f} "
                f"| {x.n_true} | {x.n_pred} |"
            )
        lines += [
            "",
            "| image | " + " | ".join(f"{m.model} AP@0.5 (predicted)" for m in self.models) + " |",
            "|---|" + "---|" * len(self.models),
        ]
        for i, name in enumerate(self.images):
            cells = [f"{m.images[i].ap_0_5:.3f} ({m.images[i].n_pred})" for m in self.models]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def load_labelled(
    pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    names: Sequence[str] | None = None,
) -> list[Labelled]:
    """Read (image, mask) file pairs as 2D (C, H, W) images and (H, W) labels.

    Raises
    ------
    InvalidInput
        For a stack (evaluation is 2D) or a mask that does not fit its image.
    """
    from cellpose_finetuning.io.images import read_image
    from cellpose_finetuning.io.masks import read_mask

    if not pairs:
        raise InvalidInput("images", "no labelled images to evaluate on")
    out = []
    for i, (img_path, mask_path) in enumerate(pairs):
        img = read_image(img_path)
        if img.ndim != 3:
            raise InvalidInput(str(img_path), f"evaluation needs 2D images (got {img.shape})")
        mask = read_mask(mask_path, expected_shape=tuple(img.shape[-2:]))
        out.append((names[i] if names else Path(img_path).name, img, mask))
    return out


def checkpoint_predictor(
    model: str | os.PathLike[str],
    settings: InferenceSettings | None = None,
    *,
    device: str | None = None,
) -> Predictor:
    """Load ``cpsam`` or a checkpoint file once and return its predictor."""
    from cellpose_finetuning.engine.inference import segment_auto
    from cellpose_finetuning.engine.models import load_cellpose_model

    cp_model, _arch = load_cellpose_model(model, device=device)
    settings = settings or InferenceSettings()

    def predict(image: np.ndarray) -> np.ndarray:
        # One pass, or block-wise for whole slides / settings.block_size (blockwise_size).
        return segment_auto(cp_model, image, settings)

    return predict


def score_predictions(
    predictions: Mapping[str, Sequence[np.ndarray]],
    data: Sequence[Labelled],
    inference: InferenceSettings | None = None,
    seconds: Mapping[str, float] | None = None,
) -> EvaluationReport:
    """Score each model's predicted labels against the ground truth of ``data``.

    Parameters
    ----------
    predictions : mapping of str to sequence of numpy.ndarray
        Each model's labels, one per image of ``data``, in report order.
    data : sequence of Labelled
        (name, image, labels) triples.
    inference : InferenceSettings, optional
        Recorded in the report.
    seconds : mapping of str to float, optional
        Time each model took, recorded in the report.
    """
    if not predictions:
        raise InvalidInput("models", "give at least one model to evaluate")
    if not data:
        raise InvalidInput("images", "no labelled images to evaluate on")
    names = [name for name, _, _ in data]
    truths = [mask for _, _, mask in data]
    scores = []
    for model_name, preds in predictions.items():
        preds = [np.asarray(p) for p in preds]
        if len(preds) != len(data):
            raise InvalidInput(model_name, f"{len(preds)} predictions for {len(data)} images")
        for (name, _, mask), pred in zip(data, preds, strict=True):
            if pred.shape != mask.shape:
                raise InvalidInput(
                    model_name, f"{name}: predicted {pred.shape}, ground truth {mask.shape}"
                )
        metrics, rows = score_masks(truths, preds, names)
        took = float((seconds or {}).get(model_name, 0.0))
        scores.append(ModelScore(model=model_name, metrics=metrics, images=rows, seconds=took))
    settings = (inference or InferenceSettings()).model_dump(mode="json")
    return EvaluationReport(images=names, models=scores, inference=settings)


def evaluate_predictors(
    predictors: Mapping[str, Predictor],
    data: Sequence[Labelled],
    inference: InferenceSettings | None = None,
) -> tuple[EvaluationReport, dict[str, list[np.ndarray]]]:
    """Segment every image with every model and score the results.

    Parameters
    ----------
    predictors : mapping of str to Predictor
        Models by the name the report gives them, in report order.
    data : sequence of Labelled
        (name, image, labels) triples, e.g. from :func:`load_labelled`.
    inference : InferenceSettings, optional
        Recorded in the report (the predictors already apply them).

    Returns
    -------
    (EvaluationReport, dict of str to list of numpy.ndarray)
        The report and each model's predicted labels, image by image.
    """
    if not predictors:
        raise InvalidInput("models", "give at least one model to evaluate")
    predictions, seconds = {}, {}
    for model_name, predict in predictors.items():
        t0 = time.perf_counter()
        predictions[model_name] = [np.asarray(predict(image)) for _, image, _ in data]
        seconds[model_name] = time.perf_counter() - t0
    return score_predictions(predictions, data, inference, seconds), predictions


def report_pictures(
    report: EvaluationReport,
    data: Sequence[Labelled],
    predictions: Mapping[str, Sequence[np.ndarray]],
    *,
    max_overlay_images: int = 4,
) -> dict[str, bytes]:
    """The bar chart and the overlay picture as PNG bytes (``bars``, ``overlays``)."""
    import tempfile

    from cellpose_finetuning.engine.plots import plot_evaluation_bars, plot_evaluation_overlays

    with tempfile.TemporaryDirectory(prefix="cpft-eval-") as tmp:
        bars = plot_evaluation_bars(report, Path(tmp) / "bars.png")
        overlays = plot_evaluation_overlays(
            report, data, predictions, Path(tmp) / "overlays.png", max_images=max_overlay_images
        )
        return {"bars": bars.read_bytes(), "overlays": overlays.read_bytes()}


def write_report(
    report: EvaluationReport,
    data: Sequence[Labelled],
    predictions: Mapping[str, Sequence[np.ndarray]],
    out: str | os.PathLike[str],
    *,
    max_overlay_images: int = 4,
) -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md``, ``per_image_ap.png``, ``overlays.png``.

    Returns
    -------
    dict of str to pathlib.Path
        The written files by kind (``json``, ``markdown``, ``bars``, ``overlays``).
    """
    from cellpose_finetuning.engine.plots import plot_evaluation_bars, plot_evaluation_overlays

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "evaluation.json",
        "markdown": out / "evaluation.md",
        "bars": out / "per_image_ap.png",
        "overlays": out / "overlays.png",
    }
    files["json"].write_text(report.model_dump_json(indent=1), encoding="utf-8")
    files["markdown"].write_text(report.to_markdown(), encoding="utf-8")
    plot_evaluation_bars(report, files["bars"])
    plot_evaluation_overlays(
        report, data, predictions, files["overlays"], max_images=max_overlay_images
    )
    return files
