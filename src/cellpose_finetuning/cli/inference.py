"""Using models on local images: ``infer`` (segment) and ``evaluate`` (score)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cellpose_finetuning.cli.options import (
    friendly_errors,
    save_formats,
    save_option,
    settings_option,
)
from cellpose_finetuning.engine.schemas import InferenceSettings


# --------------------------------------------------------------------------- infer
@click.command()
@click.option(
    "--model",
    "--pretrained_model",
    "model",
    required=True,
    help="'cpsam', a .pth checkpoint, a session directory, or a BioImage.IO package (.zip or "
    "folder) exported by cellpose-finetuning.",
)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the results (<image stem>_masks.tif, and the --save formats).",
)
@save_option(
    "Output formats, repeatable: tif (<stem>_masks.tif), seg (cellpose GUI <stem>_seg.npy), "
    "png (<stem>_cp_masks.png), rois (Fiji <stem>_rois.zip), geojson (QuPath <stem>.geojson), "
    "or all."
)
@settings_option(InferenceSettings, "diameter")
@settings_option(InferenceSettings, "flow_threshold")
@settings_option(InferenceSettings, "cellprob_threshold")
@settings_option(InferenceSettings, "niter")
@settings_option(InferenceSettings, "batch_size")
@settings_option(InferenceSettings, "do_3D", "--do-3d", name="do_3d")
@settings_option(InferenceSettings, "stitch_threshold")
@settings_option(InferenceSettings, "block_size")
@settings_option(InferenceSettings, "block_overlap")
@click.option(
    "--checkpoint",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Which checkpoint of a session to use.",
)
@click.option("--device", default=None, help="Torch device (default: cuda, mps or cpu).")
@click.option("--overlay", is_flag=True, help="Also write <stem>_overlay.png pictures.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@friendly_errors
def infer(
    model: str,
    images: tuple[Path, ...],
    out: Path,
    diameter: float | None,
    flow_threshold: float,
    cellprob_threshold: float,
    niter: int | None,
    batch_size: int,
    do_3d: bool,
    stitch_threshold: float,
    block_size: int | None,
    block_overlap: int,
    checkpoint: str,
    device: str | None,
    overlay: bool,
    as_json: bool,
    save: tuple[str, ...],
) -> None:
    """Segment images and write label masks (TIFF, and the formats of --save).

    \b
    Examples:
      cellpose-finetuning infer --model runs/first data/images/test/*.tif --out masks/
      cellpose-finetuning infer --model cpsam --diameter 17 big.tif --out masks/
      cellpose-finetuning infer --model runs/first imgs/*.tif --out imgs/ --save seg --save rois
      cellpose-finetuning infer --model cpsam slide.ome.tif --out masks/ --block-size 1024

    Whole-slide images (2D TIFF, OME-TIFF or Zarr above 16 megapixels, or any with
    --block-size) are read and segmented block by block and their labels written
    region by region to <stem>_masks.tif (BigTIFF) or <stem>_masks.zarr, so memory
    follows the block, not the image; a bar shows the blocks.
    """
    from tqdm import tqdm

    from cellpose_finetuning.engine.inference import (
        ModelCache,
        ModelResolver,
        blockwise_size,
        segment_auto,
        segment_full,
    )
    from cellpose_finetuning.io.annotations import output_stem, write_outputs
    from cellpose_finetuning.io.images import read_image

    formats = save_formats(save)

    settings = InferenceSettings(
        diameter=diameter,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        niter=niter,
        batch_size=batch_size,
        do_3D=do_3d,
        stitch_threshold=stitch_threshold,
        block_size=block_size,
        block_overlap=block_overlap,
    )
    ref = ModelResolver(allow_paths=True).resolve(model, checkpoint=checkpoint)
    cp_model = ModelCache(device=device).get(ref)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for path in tqdm(images, unit="image", disable=as_json or len(images) < 2):
        if _goes_blockwise(path, settings):
            summary.append(_infer_blockwise(cp_model, path, out, settings, formats, as_json))
            continue
        image = read_image(path)
        flows = None
        if "seg" in formats and image.ndim == 3 and blockwise_size(image.shape, settings) is None:
            # the GUI shows the network's flows: keep them for the _seg.npy
            seg = segment_full(
                cp_model, image, settings.model_copy(update={"return_flows": True}), name=str(path)
            )
            masks, flows = seg.masks, seg.flows
        else:
            masks = segment_auto(cp_model, image, settings, name=str(path))
        stem = output_stem(path.name)
        written = write_outputs(out, path.name, masks, formats, image=image, flows=flows)
        target = next(iter(written.values()))
        if overlay and image.ndim == 3:
            from PIL import Image

            from cellpose_finetuning.engine.plots import overlay_masks

            Image.fromarray(overlay_masks(image, masks)).save(out / f"{stem}_overlay.png")
        n_obj = int(len(set(masks.ravel().tolist())) - (1 if (masks == 0).any() else 0))
        summary.append(
            {
                "image": str(path),
                "masks": str(target),
                "files": {fmt: str(p) for fmt, p in written.items()},
                "shape": list(masks.shape),
                "dtype": str(masks.dtype),
                "n_objects": n_obj,
            }
        )
        if not as_json:
            shown = ", ".join(str(p) for p in written.values())
            tqdm.write(f"{path} -> {shown} ({n_obj} objects)")
    if as_json:
        click.echo(json.dumps(summary, indent=1))


def _goes_blockwise(path: Path, settings: InferenceSettings) -> bool:
    """Whether ``path`` is segmented block-wise from disk (engine's ``blockwise_size``)."""
    from cellpose_finetuning.engine.inference import blockwise_size, lazy_2d_shape

    shape = lazy_2d_shape(path)
    if shape is None:  # other formats are read whole; segment_auto may still go block-wise
        return False
    return blockwise_size(shape, settings, name=str(path)) is not None


def _infer_blockwise(
    cp_model: Any,
    path: Path,
    out: Path,
    settings: InferenceSettings,
    formats: list[str],
    as_json: bool,
) -> dict[str, Any]:
    """Segment one image block by block from disk into <stem>_masks.tif/.zarr, with a bar."""
    from tqdm import tqdm

    from cellpose_finetuning.engine.inference import segment_auto
    from cellpose_finetuning.io.annotations import output_stem

    stem = output_stem(path.name)
    target = out / f"{stem}_masks{'.zarr' if path.suffix.lower() == '.zarr' else '.tif'}"
    with tqdm(unit="step", desc=path.name, disable=as_json, leave=False) as bar:

        def progress(p: Any) -> None:
            bar.total = p.total
            bar.set_postfix(objects=p.objects, refresh=False)
            bar.update(p.done - bar.n)

        result = segment_auto(
            cp_model, path, settings, name=str(path), out=target, progress=progress
        )
    skipped = [f for f in formats if f != "tif"]
    if not as_json:
        note = f"; not written block-wise: {', '.join(skipped)}" if skipped else ""
        tqdm.write(
            f"{path} -> {target} ({result.n_objects} objects, {result.n_blocks} blocks of "
            f"{result.block_size}², {result.seconds:.1f} s{note})"
        )
    return {
        "image": str(path),
        "masks": str(target),
        "files": {"tif" if target.suffix == ".tif" else "zarr": str(target)},
        "shape": list(result.shape),
        "dtype": str(result.masks.dtype),
        "n_objects": int(result.n_objects),
        "blockwise": {
            "block_size": result.block_size,
            "overlap": result.overlap,
            "n_blocks": result.n_blocks,
            "truncated": result.truncated,
            "seconds": round(result.seconds, 3),
            "not_written": skipped,
        },
    }


# --------------------------------------------------------------------------- evaluate
def _model_label(model: str) -> str:
    """A short name for a model in tables and pictures."""
    path = Path(model)
    if model == "cpsam" or not (path.exists() or path.suffix):
        return model
    if path.is_dir():
        return path.name
    return path.stem if path.suffix in (".pth", ".zip", ".pt") else path.name


def _predictors(models: tuple[str, ...], settings: Any, device: str | None) -> dict[str, Any]:
    """Load each model once: cpsam, checkpoints, session folders, exported packages."""
    import zipfile

    from cellpose_finetuning.engine.evaluation import checkpoint_predictor
    from cellpose_finetuning.engine.inference import ModelResolver

    resolver = ModelResolver(allow_paths=True)
    out: dict[str, Any] = {}
    for model in models:
        label = _model_label(model)
        while label in out:
            label += "'"
        path = Path(model)
        # A .pth is a zip too (torch's format): packages are .zip files or rdf.yaml folders.
        is_zip = path.suffix.lower() == ".zip" and path.is_file() and zipfile.is_zipfile(path)
        if is_zip or (path / "rdf.yaml").is_file():
            from cellpose_finetuning.export.bioimageio import package_predictor

            out[label] = package_predictor(path)
        else:
            ref = resolver.resolve(model)
            out[label] = checkpoint_predictor(ref.source, settings, device=device)
    return out


def evaluate_models(
    models: tuple[str, ...],
    images: str,
    annotations: str,
    out: Path,
    settings: InferenceSettings,
    *,
    device: str | None = None,
    as_json: bool = False,
) -> None:
    """Score ``models`` on labelled images, write the report to ``out`` and print it."""
    from cellpose_finetuning.cli.training import local_pairs
    from cellpose_finetuning.engine.evaluation import (
        evaluate_predictors,
        load_labelled,
        write_report,
    )

    pairs = local_pairs(images, annotations, "--images", "--annotations")
    data = load_labelled(pairs)
    report, predictions = evaluate_predictors(_predictors(models, settings, device), data, settings)
    files = write_report(report, data, predictions, out)
    if as_json:
        click.echo(report.model_dump_json(indent=1))
        return
    click.echo(report.to_markdown())
    for kind, path in files.items():
        click.echo(f"{kind:9s}: {path}")


@click.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    help="A model to score (repeat): 'cpsam', a .pth checkpoint, a session directory, or an "
    "exported BioImage.IO package (folder or .zip, run with its own thresholds).",
)
@click.option("--images", required=True, help="Folder ending in '/' or a pattern, as in train.")
@click.option("--annotations", required=True, help="Ground-truth masks, same forms.")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("evaluation"),
    show_default=True,
    help="Folder for evaluation.json, evaluation.md, per_image_ap.png, overlays.png.",
)
@settings_option(InferenceSettings, "diameter")
@settings_option(InferenceSettings, "flow_threshold")
@settings_option(InferenceSettings, "cellprob_threshold")
@settings_option(InferenceSettings, "block_size")
@settings_option(InferenceSettings, "block_overlap")
@click.option("--device", default=None, help="Torch device (default: cuda, mps or cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly_errors
def evaluate(
    models: tuple[str, ...],
    images: str,
    annotations: str,
    out: Path,
    diameter: float | None,
    flow_threshold: float,
    cellprob_threshold: float,
    block_size: int | None,
    block_overlap: int,
    device: str | None,
    as_json: bool,
) -> None:
    """Score models on labelled images: did fine-tuning help?

    Each model segments every image with the same settings; AP at IoU 0.5,
    0.75, 0.9 (cellpose's matching), precision, recall and F1 at 0.5, per
    image and for the set.

    \b
    Example:
      cellpose-finetuning evaluate --model tiny.pth --model runs/first \\
          --images data/images/test/ --annotations data/annotations/test/ --out eval/
    """
    settings = InferenceSettings(
        diameter=diameter,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        block_size=block_size,
        block_overlap=block_overlap,
    )
    evaluate_models(models, images, annotations, out, settings, device=device, as_json=as_json)
