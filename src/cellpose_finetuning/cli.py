"""Command line: train, watch, stop, continue and use models on local folders.

Built on click (argument parsing, help pages) and tqdm (progress bars).
Errors print as one line and exit non-zero; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.errors import CellposeFinetuningError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
EXIT_FAILED = 1


def _friendly_errors(func: F) -> F:
    """Turn our typed errors (and a few common ones) into one-line messages."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = click.get_current_context().find_root().params.get("verbose", False)
        try:
            return func(*args, **kwargs)
        except (CellposeFinetuningError, FileNotFoundError, ValueError) as exc:
            if verbose:
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="cellpose-finetuning")
def main(verbose: bool) -> None:
    """Fine-tune Cellpose-SAM on your annotated images and segment with the result.

    \b
    Quick start (local folders, no server):
      cellpose-finetuning init-model --preset tiny --out tiny.pth
      cellpose-finetuning train --train-images data/images/ --train-annotations \\
          data/annotations/ --model tiny.pth --n-epochs 3 --out runs/first
      cellpose-finetuning infer --model runs/first new_images/*.tif --out masks/
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


# --------------------------------------------------------------------------- init-model
@main.command("init-model")
@click.option(
    "--preset",
    type=click.Choice(["tiny", "small", "cpsam"]),
    default="tiny",
    show_default=True,
    help="tiny: ~0.75 M parameters (tests, CPU demos); small: ~1.7 M; cpsam: the real "
    "Cellpose-SAM size (304 M, 1.2 GB file).",
)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_friendly_errors
def init_model(preset: str, out: Path, seed: int) -> None:
    """Write an untrained network of cellpose's own Transformer class.

    \b
    Example:
      cellpose-finetuning init-model --preset tiny --out tiny.pth
    """
    import torch

    from cellpose_finetuning.engine.models import PRESETS, build_network, save_network

    torch.manual_seed(seed)
    net = build_network(PRESETS[preset])
    save_network(net, PRESETS[preset], out)
    n_params = sum(p.numel() for p in net.parameters())
    click.echo(f"Wrote {out} ({preset}, {n_params:,} parameters)")


# --------------------------------------------------------------------------- train
def _recipe_options(func: F) -> F:
    """``--recipe``, ``--nimg-per-epoch`` and ``--sampling`` for ``train``."""
    from cellpose_finetuning.engine.recipes import RECIPES

    func = click.option(
        "--sampling",
        type=click.Choice(["permutation", "cellpose"]),
        default=None,
        help="How an epoch picks images: 'permutation' (default: each image once per pass) "
        "or 'cellpose' (train_seg's draws with replacement when --nimg-per-epoch differs "
        "from the number of images).",
    )(func)
    func = click.option(
        "--nimg-per-epoch",
        type=int,
        default=None,
        help="Training tiles per epoch (cellpose's nimg_per_epoch; default: one per image).",
    )(func)
    return click.option(
        "--recipe",
        type=click.Choice(list(RECIPES)),
        default=None,
        help="Named settings; options you give explicitly win. "
        + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
    )(func)


def _with_recipe(values: dict[str, Any], recipe: str | None) -> dict[str, Any]:
    """Apply a recipe to the CLI's values (its defaults are the contract's)."""
    from cellpose_finetuning.engine.recipes import apply_recipe

    return apply_recipe(values, recipe)


def _echo_warnings(session: Any) -> None:
    """Say before a run starts when its settings cannot plausibly change the model."""
    from cellpose_finetuning.engine.recipes import model_architecture, settings_warnings

    settings = session.settings
    arch = model_architecture(settings.model)
    for warning in settings_warnings(settings, arch=arch, n_train=len(session.data.train)):
        click.echo(f"Warning: {warning}", err=True)


def _echo_ap_change(status: Any) -> None:
    """The last line of a run: "Fine-tuning: AP@0.5 0.31 → 0.62 (+0.31)"."""
    from cellpose_finetuning.engine.metrics import ap_change

    change = ap_change(status.base_instance_metrics, status.instance_metrics)
    if change:
        click.echo(f"Fine-tuning on the test set: {change}")


def _local_pairs(images: str, annotations: str, images_arg: str, annotations_arg: str) -> list:
    from cellpose_finetuning.data.local import pair_local_specs

    return pair_local_specs(
        images, annotations, images_arg=images_arg, annotations_arg=annotations_arg
    )


def _follow(session: Any, worker: Any, as_json: bool) -> Any:
    """Show a progress bar until the worker ends; Ctrl-C asks the run to stop."""
    from tqdm import tqdm

    status = session.read_status()
    bar = tqdm(
        total=status.total_epochs or 0,
        initial=status.current_epoch or 0,
        unit="epoch",
        disable=as_json,
        dynamic_ncols=True,
    )
    last_mtime = 0.0
    try:
        while worker.is_alive():
            worker.process.join(0.25)
            try:
                mtime = session.status_file.stat().st_mtime
            except FileNotFoundError:
                continue
            if mtime == last_mtime:
                continue
            last_mtime = mtime
            status = session.read_status(reconcile=False)
            bar.total = status.total_epochs or bar.total
            bar.n = status.current_epoch or 0
            postfix: dict[str, str] = {"state": status.status_type}
            if status.train_losses:
                postfix["loss"] = f"{status.train_losses[-1]:.4f}"
            f1 = next((m.f1 for m in reversed(status.test_metrics) if m), None)
            if f1 is not None:
                postfix["F1"] = f"{f1:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.set_description(status.status_type)
            bar.refresh()
    except KeyboardInterrupt:
        session.request_stop()
        click.echo("\nStopping after the current batch (Ctrl-C again to abort)...", err=True)
        worker.process.join()
    finally:
        status = worker.wait()
        bar.n = status.current_epoch or 0
        bar.refresh()
        bar.close()
    return status


def _report(status: Any, session: Any, as_json: bool) -> None:
    if as_json:
        click.echo(status.model_dump_json(indent=1))
    else:
        click.echo(f"[{status.status_type}] {status.message}")
        if status.instance_metrics:
            im = status.instance_metrics
            click.echo(
                f"Test set: AP@0.5={im.ap_0_5:.3f} AP@0.75={im.ap_0_75:.3f} "
                f"AP@0.9={im.ap_0_9:.3f} ({im.n_pred} predicted, {im.n_true} true objects)"
            )
        click.echo(f"Session: {session.path}")
        if session.curves_file.is_file():
            click.echo(f"Curves:  {session.curves_file}")
        _echo_ap_change(status)
    if status.status_type == "failed":
        sys.exit(EXIT_FAILED)


@main.command()
@click.option(
    "--train-images",
    default=None,
    help="Folder ending in '/' or a pattern like 'imgs/*.tif' (or use --dir).",
)
@click.option(
    "--train-annotations",
    default=None,
    help="Folder ending in '/' (same file names) or a pattern like 'masks/*_mask.tif' or "
    "'masks/*_seg.npy' (the '*' parts must match).",
)
@click.option("--test-images", default=None, help="Test images, same forms.")
@click.option("--test-annotations", default=None, help="Test masks, same forms.")
@click.option(
    "--dir",
    "cp_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="cellpose's form: images and annotations in one folder (with --mask_filter).",
)
@click.option(
    "--test_dir",
    "--test-dir",
    "cp_test_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="cellpose's form for the test images.",
)
@click.option(
    "--mask_filter",
    "--mask-filter",
    "mask_filter",
    default="_masks",
    show_default=True,
    help="With --dir: what annotation names add to their image's stem (_seg.npy for GUI files).",
)
@click.option(
    "--model",
    "--pretrained_model",
    "model",
    default="cpsam",
    show_default=True,
    help="Base model: 'cpsam', a .pth checkpoint, or a session directory.",
)
@click.option("--n-epochs", "--n_epochs", "n_epochs", type=int, default=10, show_default=True)
@click.option(
    "--learning-rate",
    "--learning_rate",
    "learning_rate",
    type=float,
    default=1e-6,
    show_default=True,
)
@click.option(
    "--weight-decay",
    "--weight_decay",
    "weight_decay",
    type=float,
    default=1e-4,
    show_default=True,
)
@click.option(
    "--validation-interval",
    type=int,
    default=None,
    help="Validate every K epochs (always the first and last). Default 10.",
)
@click.option("--n-samples", type=int, default=None, help="Random subset of training pairs.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option(
    "--min-train-masks",
    "--min_train_masks",
    "min_train_masks",
    type=int,
    default=TrainingSettings.model_fields["min_train_masks"].default,
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="Torch device (default: cuda, mps or cpu).")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Session directory to create.",
)
@click.option("--detach", is_flag=True, help="Start the run and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@_recipe_options
@_friendly_errors
def train(
    train_images: str | None,
    train_annotations: str | None,
    test_images: str | None,
    test_annotations: str | None,
    cp_dir: Path | None,
    cp_test_dir: Path | None,
    mask_filter: str,
    model: str,
    n_epochs: int,
    learning_rate: float,
    weight_decay: float,
    validation_interval: int | None,
    n_samples: int | None,
    batch_size: int,
    min_train_masks: int,
    seed: int,
    device: str | None,
    out: Path,
    detach: bool,
    as_json: bool,
    recipe: str | None = None,
    nimg_per_epoch: int | None = None,
    sampling: str | None = None,
) -> None:
    """Fine-tune a model on local images and masks.

    \b
    Examples:
      cellpose-finetuning train --train-images data/images/train/ \\
          --train-annotations data/annotations/train/ --model cpsam \\
          --n-epochs 100 --learning-rate 1e-5 --weight-decay 0.1 --out runs/a
      cellpose-finetuning train --train-images 'imgs/*.ome.tif' \\
          --train-annotations 'masks/*_mask.ome.tif' --test-images test/imgs/ \\
          --test-annotations test/masks/ --validation-interval 1 --model tiny.pth \\
          --n-epochs 3 --out runs/b
      cellpose-finetuning train --dir gui_annotated/ --mask_filter _seg.npy \\
          --pretrained_model cpsam --n_epochs 100 --learning_rate 1e-5 --out runs/c
      cellpose-finetuning train --recipe from-scratch --model tiny.pth \\
          --train-images data/images/train/ --train-annotations data/annotations/train/ \\
          --out runs/d
    """
    from cellpose_finetuning.engine.runs import create_local_session
    from cellpose_finetuning.engine.training import start_worker

    train_images, train_annotations = _cellpose_dir(
        cp_dir, mask_filter, train_images, train_annotations, "--dir", "--train"
    )
    test_images, test_annotations = _cellpose_dir(
        cp_test_dir, mask_filter, test_images, test_annotations, "--test_dir", "--test"
    )
    if train_images is None or train_annotations is None:
        from cellpose_finetuning.errors import InvalidInput

        missing = "--train-images" if train_images is None else "--train-annotations"
        raise InvalidInput(missing, "give --train-images and --train-annotations, or --dir")

    settings = _with_recipe(
        dict(
            model=model,
            n_epochs=n_epochs,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            validation_interval=validation_interval,
            n_samples=n_samples,
            batch_size=batch_size,
            min_train_masks=min_train_masks,
            seed=seed,
            device=device,
            nimg_per_epoch=nimg_per_epoch,
            sampling=sampling,
        ),
        recipe,
    )
    session = create_local_session(
        out=out,
        train_pairs=_local_pairs(
            train_images, train_annotations, "--train-images", "--train-annotations"
        ),
        test_pairs=_test_pairs(test_images, test_annotations),
        settings=settings,
        source={
            "train_images": train_images,
            "train_annotations": train_annotations,
            "test_images": test_images,
            "test_annotations": test_annotations,
        },
    )
    _echo_warnings(session)
    worker = start_worker(session)
    if detach:
        click.echo(f"Started {session.path} (worker pid {worker.pid})")
        return
    _report(_follow(session, worker, as_json), session, as_json)


def _cellpose_dir(
    folder: Path | None,
    mask_filter: str,
    images: str | None,
    annotations: str | None,
    arg: str,
    ours: str,
) -> tuple[str | None, str | None]:
    """cellpose's --dir/--mask_filter as our two specs (or ours unchanged without --dir)."""
    if folder is None:
        return images, annotations
    from cellpose_finetuning.data.local import cellpose_dir_specs
    from cellpose_finetuning.errors import InvalidInput

    if images is not None or annotations is not None:
        raise InvalidInput(arg, f"give either {arg} or {ours}-images/{ours}-annotations")
    return cellpose_dir_specs(folder, mask_filter, arg)


def _test_pairs(test_images: str | None, test_annotations: str | None) -> list:
    from cellpose_finetuning.errors import InvalidInput

    if (test_images is None) != (test_annotations is None):
        missing = "--test-annotations" if test_annotations is None else "--test-images"
        raise InvalidInput(missing, "test images and test annotations must be given together")
    if test_images is None or test_annotations is None:
        return []
    return _local_pairs(test_images, test_annotations, "--test-images", "--test-annotations")


def _open_session(path: Path) -> Any:
    from cellpose_finetuning.engine.sessions import SessionStore

    path = Path(path)
    return SessionStore(path.parent if str(path.parent) else ".").get(path.name)


@main.command("continue")
@click.argument("session_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--n-epochs",
    type=int,
    default=None,
    help="Epochs to add (default: the session's n_epochs; a stopped or failed run "
    "first finishes its planned epochs).",
)
@click.option("--detach", is_flag=True, help="Start and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@_friendly_errors
def continue_(session_dir: Path, n_epochs: int | None, detach: bool, as_json: bool) -> None:
    """Continue a completed, stopped or failed session from its last weights.

    \b
    Example:
      cellpose-finetuning continue runs/first --n-epochs 5
    """
    from cellpose_finetuning.engine.training import continue_session, start_worker

    session = _open_session(session_dir)
    continue_session(session, n_epochs)
    worker = start_worker(session, resume=True)
    if detach:
        click.echo(f"Continuing {session.path} (worker pid {worker.pid})")
        return
    _report(_follow(session, worker, as_json), session, as_json)


@main.command()
@click.argument("session_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--plot",
    "plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    is_flag=False,
    flag_value=Path("-"),
    help="Also draw the training curves (to the given PNG, or the session's).",
)
@_friendly_errors
def status(session_dir: Path, plot: Path | None) -> None:
    """Print a session's status as JSON (the service's get_training_status).

    \b
    Example:
      cellpose-finetuning status runs/first --plot
    """
    session = _open_session(session_dir)
    st = session.read_status()
    click.echo(st.model_dump_json(indent=1))
    if plot is not None:
        from cellpose_finetuning.engine.plots import plot_training_curves

        target = session.curves_file if str(plot) == "-" else plot
        click.echo(f"Curves: {plot_training_curves(st, target)}", err=True)


@main.command()
@click.argument("session_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Wait until the run has stopped."
)
@_friendly_errors
def stop(session_dir: Path, wait: bool) -> None:
    """Ask a running session to stop after the current batch, keeping its weights.

    \b
    Example:
      cellpose-finetuning stop runs/first
    """
    from cellpose_finetuning.engine.schemas import TERMINAL_STATES

    session = _open_session(session_dir)
    st = session.read_status()
    if st.status_type in TERMINAL_STATES:
        click.echo(f"Session is already {st.status_type}.")
        return
    session.request_stop()
    click.echo("Stop requested.")
    while wait and session.read_status().status_type not in TERMINAL_STATES:
        time.sleep(0.25)
    if wait:
        click.echo(f"[{session.read_status().status_type}] {session.read_status().message}")


# --------------------------------------------------------------------------- infer
_SAVE_FORMATS = ("tif", "seg", "png", "rois", "geojson")  # io.annotations.OUTPUT_FORMATS


def _save_formats(save: tuple[str, ...]) -> list[str]:
    return list(_SAVE_FORMATS) if "all" in save else list(dict.fromkeys(save))


@main.command()
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
@click.option(
    "--save",
    "save",
    multiple=True,
    type=click.Choice([*_SAVE_FORMATS, "all"]),
    default=("tif",),
    show_default=True,
    help="Output formats, repeatable: tif (<stem>_masks.tif), seg (cellpose GUI <stem>_seg.npy), "
    "png (<stem>_cp_masks.png), rois (Fiji <stem>_rois.zip), geojson (QuPath <stem>.geojson), "
    "or all.",
)
@click.option(
    "--diameter",
    type=float,
    default=None,
    help="Object diameter in pixels; the image is resized by 30/diameter. Default: no resizing.",
)
@click.option("--flow-threshold", type=float, default=0.4, show_default=True)
@click.option("--cellprob-threshold", type=float, default=0.0, show_default=True)
@click.option("--niter", type=int, default=None, help="Dynamics iterations (default: auto).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--do-3d", "do_3d", is_flag=True, help="3D segmentation of (Z,C,H,W) stacks.")
@click.option(
    "--stitch-threshold",
    type=float,
    default=0.0,
    show_default=True,
    help="Segment stack planes in 2D and stitch them (IoU threshold).",
)
@click.option(
    "--checkpoint",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Which checkpoint of a session to use.",
)
@click.option("--device", default=None)
@click.option("--overlay", is_flag=True, help="Also write <stem>_overlay.png pictures.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@_friendly_errors
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
    """
    from tqdm import tqdm

    from cellpose_finetuning.engine.inference import ModelCache, ModelResolver, segment
    from cellpose_finetuning.engine.schemas import InferenceSettings
    from cellpose_finetuning.io.annotations import output_stem, write_outputs
    from cellpose_finetuning.io.images import read_image

    formats = _save_formats(save)

    settings = InferenceSettings(
        diameter=diameter,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        niter=niter,
        batch_size=batch_size,
        do_3D=do_3d,
        stitch_threshold=stitch_threshold,
    )
    ref = ModelResolver(allow_paths=True).resolve(model, checkpoint=checkpoint)
    cp_model = ModelCache(device=device).get(ref)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for path in tqdm(images, unit="image", disable=as_json or len(images) < 2):
        image = read_image(path)
        masks = segment(cp_model, image, settings, name=str(path))
        stem = output_stem(path.name)
        written = write_outputs(out, path.name, masks, formats, image=image)
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


# --------------------------------------------------------------------------- export
@main.command("export")
@click.argument("session_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="model.zip (the package folder <stem>/ is written beside it) or a folder.",
)
@click.option(
    "--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True
)
@click.option(
    "--name", default=None, help="Model name: letters, digits, _+-() and spaces, 5-128 characters."
)
@click.option(
    "--license",
    "license_",
    default=None,
    help="SPDX id. Default: the base model's (BSD-3-Clause for cpsam), MIT for "
    "tiny/small networks.",
)
@click.option(
    "--test/--no-test",
    "run_test",
    default=False,
    help="Also run bioimageio.core's model test on the package.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option(
    "--flow-threshold",
    type=float,
    default=0.4,
    show_default=True,
    help="Baked into the exported model.",
)
@click.option(
    "--cellprob-threshold",
    type=float,
    default=0.0,
    show_default=True,
    help="Baked into the exported model.",
)
@click.option(
    "--publish",
    "publish",
    default=None,
    metavar="COLLECTION",
    help="Also upload the package to this collection (e.g. "
    "bioimage-io/colab-annotations) with your own token.",
)
@click.option("--alias", default=None, help="Artifact alias when publishing (default: name).")
@click.option(
    "--format",
    "package_format",
    type=click.Choice(["standard", "wrapper"]),
    default="standard",
    show_default=True,
    help="standard: the network in pytorch_state_dict, torchscript and onnx, with bioimage.io's "
    "scale_range and cellpose_flow_dynamics steps; wrapper: model.py runs all of cellpose "
    "(labels out), for bioimageio.core < 0.11.",
)
@click.option(
    "--author",
    "authors",
    multiple=True,
    help='Repeatable. "Name", "Name; Affiliation" or a JSON object with name, affiliation, '
    "email, github_user, orcid. Default: the session's owner.",
)
@click.option(
    "--cite",
    multiple=True,
    help='Repeatable. "Text; DOI-or-URL" or a JSON object with text and doi/url; added after '
    "the cellpose, Cellpose-SAM and SAM papers.",
)
@click.option("--tag", "tags", multiple=True, help="Repeatable. Extra tag, e.g. nuclei.")
@click.option("--description", default=None, help="Model description (default: generated).")
@click.option(
    "--documentation",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Markdown file put at the top of doc.md.",
)
@click.option(
    "--server-url",
    envvar="HYPHA_SERVER_URL",
    default=None,
    help="Server for --publish (default $HYPHA_SERVER_URL).",
)
@click.option(
    "--token",
    envvar="HYPHA_TOKEN",
    default=None,
    help="Token for --publish (default $HYPHA_TOKEN).",
)
@_friendly_errors
def export(
    session_dir: Path,
    out: Path,
    checkpoint: str,
    name: str | None,
    license_: str | None,
    run_test: bool,
    overwrite: bool,
    flow_threshold: float,
    cellprob_threshold: float,
    publish: str | None,
    alias: str | None,
    package_format: str,
    authors: tuple[str, ...],
    cite: tuple[str, ...],
    tags: tuple[str, ...],
    description: str | None,
    documentation: Path | None,
    server_url: str | None,
    token: str | None,
) -> None:
    """Write a validated BioImage.IO model package of a finished or stopped session.

    \b
    Examples:
      cellpose-finetuning export runs/first --out my-model.zip --test
      HYPHA_SERVER_URL=http://127.0.0.1:9527 HYPHA_TOKEN=... cellpose-finetuning export \\
          runs/first --out my-model.zip --publish bioimage-io/colab-annotations --alias my-model
    """
    from cellpose_finetuning.engine.schemas import InferenceSettings
    from cellpose_finetuning.export.bioimageio import export_command_impl

    inference = InferenceSettings(
        flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold
    )
    report = export_command_impl(
        session_dir,
        out,
        checkpoint,
        name,
        license_,
        inference=inference,
        run_test=run_test,
        overwrite=overwrite,
        format=package_format,
        authors=[_parse_entry(a, "name", "affiliation", "--author") for a in authors] or None,
        cite=[_parse_citation(c) for c in cite] or None,
        tags=list(tags) or None,
        description=description,
        documentation=documentation,
    )
    if publish:
        report["published"] = _publish(
            report, session_dir, publish, alias or name, server_url, token
        )
    click.echo(json.dumps(report, indent=1, default=str))


def _parse_entry(text: str, first: str, second: str, option: str) -> dict[str, Any]:
    """A JSON object, or "first; second" (the second part optional)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None
        if not isinstance(value, dict):
            raise click.BadParameter("expected a JSON object", param_hint=option)
        return value
    head, _, tail = (part.strip() for part in text.partition(";"))
    return {first: head, **({second: tail} if tail else {})}


def _parse_citation(text: str) -> dict[str, Any]:
    """ "Text; 10.xxx/yyy" (a DOI) or "Text; https://..." (a URL), or a JSON object."""
    entry = _parse_entry(text, "text", "ref", "--cite")
    ref = entry.pop("ref", None)
    if ref:
        key = "url" if ref.startswith(("http://", "https://")) else "doi"
        entry[key] = ref.removeprefix("doi:").strip()
    return entry


def _publish(
    report: dict[str, Any],
    session_dir: Path,
    collection: str,
    alias: str | None,
    server_url: str | None,
    token: str | None,
) -> dict[str, Any]:
    """Upload a locally built package with the user's own credentials."""
    import asyncio

    from cellpose_finetuning.client import connect, publish_package
    from cellpose_finetuning.engine.sessions import Session

    if not server_url:
        raise click.UsageError("--publish needs --server-url (or HYPHA_SERVER_URL)")
    dataset = Session(session_dir).data.dataset_artifact_id
    alias = (alias or Path(session_dir).name).lower().replace(" ", "-")

    async def go() -> dict[str, Any]:
        server, _ = await connect(server_url, token=token)
        try:
            return await publish_package(
                server,
                Path(report["path"]),
                collection=collection,
                alias=alias,
                training_dataset_id=dataset,
            )
        finally:
            await server.disconnect()

    try:
        return asyncio.run(go())
    except Exception as exc:
        raise click.ClickException(_remote_message(exc)) from None


# --------------------------------------------------------------------------- service
def _stack_options(func: F) -> F:
    options = [
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=Path.home() / ".cellpose-finetuning",
            show_default=True,
            help="Where the stack keeps S3 data, the database, sessions and models.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@_stack_options
@click.option("--hypha-port", type=int, default=9527, show_default=True)
@click.option("--s3-port", type=int, default=9483, show_default=True)
@click.option("--weed-master-port", type=int, default=9433, show_default=True)
@click.option("--weed-volume-port", type=int, default=9480, show_default=True)
@click.option("--weed-filer-port", type=int, default=9488, show_default=True)
@click.option(
    "--user",
    default="local-user",
    show_default=True,
    help="User whose token is printed and written to connection.json.",
)
@click.option(
    "--server-url",
    default=None,
    help="Register on this existing Hypha server instead of starting a stack.",
)
@click.option("--workspace", default=None, help="Workspace on --server-url.")
@click.option("--token", default=None, help="Token for --server-url (default: $HYPHA_TOKEN).")
@click.option("--max-concurrent-trainings", type=int, default=1, show_default=True)
@click.option("--max-active-sessions-per-user", type=int, default=3, show_default=True)
@click.option("--max-epochs", type=int, default=1000, show_default=True)
@click.option(
    "--max-pixels",
    type=int,
    default=64 * 1024 * 1024,
    show_default=True,
    help="Largest image accepted, in values (all axes).",
)
@click.option(
    "--max-files",
    type=int,
    default=50_000,
    show_default=True,
    help="Most files a dataset listing may have.",
)
@click.option(
    "--max-sessions-per-user",
    type=int,
    default=100,
    show_default=True,
    help="Training sessions a user may keep (any state).",
)
@click.option(
    "--max-waiting-infers-per-user",
    type=int,
    default=32,
    show_default=True,
    help="infer calls of one user that may wait; more are refused.",
)
@click.option(
    "--training-time-slice",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a training keeps its slot before pausing (after its epoch) for another "
    "user's waiting session; -1: never.",
)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where inference and training run: this process, or Ray Serve replicas and Ray tasks.",
)
@click.option(
    "--ray-address",
    default=None,
    help="Join this Ray cluster (e.g. 'auto' or 'ray://head:10001') instead of starting one.",
)
@click.option(
    "--ray-num-cpus", type=int, default=2, show_default=True, help="CPUs of the local Ray."
)
@click.option("--ray-num-gpus", type=int, default=None, help="GPUs of the local Ray.")
@click.option("--inference-replicas", type=int, default=1, show_default=True)
@click.option(
    "--max-inference-replicas",
    type=int,
    default=None,
    help="Autoscale inference replicas up to this many when calls queue up.",
)
@click.option("--replica-cpus", type=float, default=1.0, show_default=True)
@click.option(
    "--replica-gpus",
    type=float,
    default=0.0,
    show_default=True,
    help="GPU per inference replica; 0.5 lets two replicas share one GPU.",
)
@click.option("--training-cpus", type=float, default=1.0, show_default=True)
@click.option("--training-gpus", type=float, default=0.0, show_default=True)
@click.option(
    "--max-queued-trainings",
    type=int,
    default=16,
    show_default=True,
    help="Ray backend: sessions that may wait for a training slot.",
)
@_friendly_errors
def serve(
    data_dir: Path,
    hypha_port: int,
    s3_port: int,
    weed_master_port: int,
    weed_volume_port: int,
    weed_filer_port: int,
    user: str,
    server_url: str | None,
    workspace: str | None,
    token: str | None,
    max_concurrent_trainings: int,
    max_active_sessions_per_user: int,
    max_epochs: int,
    max_pixels: int,
    max_files: int,
    max_sessions_per_user: int,
    max_waiting_infers_per_user: int,
    training_time_slice: float,
    backend: str,
    ray_address: str | None,
    ray_num_cpus: int,
    ray_num_gpus: int | None,
    inference_replicas: int,
    max_inference_replicas: int | None,
    replica_cpus: float,
    replica_gpus: float,
    training_cpus: float,
    training_gpus: float,
    max_queued_trainings: int,
) -> None:
    """Run the service on its embedded local stack (SeaweedFS + Hypha), or on a server.

    \b
    Examples:
      cellpose-finetuning serve                       # local stack, prints URL and token
      cellpose-finetuning serve --hypha-port 9600 --s3-port 9601
      HYPHA_TOKEN=... cellpose-finetuning serve --server-url https://hypha.aicell.io
      cellpose-finetuning serve --backend ray --inference-replicas 2 --replica-cpus 0.5
      cellpose-finetuning serve --backend ray --ray-address auto --replica-gpus 0.5
    """
    import asyncio

    from cellpose_finetuning.deploy.serve import ServeOptions
    from cellpose_finetuning.deploy.serve import serve as run_serve
    from cellpose_finetuning.deploy.stack import StackConfig, check_platform
    from cellpose_finetuning.engine.devices import unused_gpu_reason

    if not server_url:
        check_platform()  # the embedded stack needs Linux or macOS: say so before anything
    if reason := unused_gpu_reason():  # at start, not at the first slow request
        click.echo(f"warning: {reason}", err=True)
    ray_options = None
    if backend == "ray":
        from cellpose_finetuning.deploy.ray_backend import RayOptions

        ray_options = RayOptions(
            address=ray_address,
            num_cpus=ray_num_cpus,
            num_gpus=ray_num_gpus,
            inference_replicas=inference_replicas,
            max_inference_replicas=max_inference_replicas,
            replica_cpus=replica_cpus,
            replica_gpus=replica_gpus,
            training_cpus=training_cpus,
            training_gpus=training_gpus,
            max_queued_trainings=max_queued_trainings,
        )
    stack = StackConfig(
        data_dir=data_dir,
        hypha_port=hypha_port,
        s3_port=s3_port,
        weed_master_port=weed_master_port,
        weed_volume_port=weed_volume_port,
        weed_filer_port=weed_filer_port,
    )
    options = ServeOptions(
        data_dir=data_dir,
        stack=None if server_url else stack,
        server_url=server_url,
        workspace=workspace,
        token=token,
        user=user,
        service_config={
            "max_concurrent_trainings": max_concurrent_trainings,
            "max_active_sessions_per_user": max_active_sessions_per_user,
            "max_epochs": max_epochs,
            "max_pixels": max_pixels,
            "max_files": max_files,
            "max_sessions_per_user": max_sessions_per_user,
            "max_waiting_infers_per_user": max_waiting_infers_per_user,
            "training_time_slice_s": None if training_time_slice < 0 else training_time_slice,
        },
        backend=backend,
        ray=ray_options,
    )
    result = asyncio.run(run_serve(options, own_process=True))
    if result["forced"]:
        # A second signal asked for a fast stop and every child is gone: skip
        # the exit hooks (Ray's would wait for the processes killed above).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@main.command()
@_stack_options
@click.option("--user", required=True, help="User id; their workspace is ws-user-<id>.")
@click.option(
    "--expires-in", type=int, default=30 * 24 * 3600, show_default=True, help="Lifetime in seconds."
)
@_friendly_errors
def token(data_dir: Path, user: str, expires_in: int) -> None:
    """Print a token for a user of the embedded stack.

    \b
    Example:
      cellpose-finetuning token --user alice
    """
    from cellpose_finetuning.deploy.stack import EmbeddedStack, StackConfig

    stack = EmbeddedStack(StackConfig(data_dir=data_dir))
    if not (stack.data_dir / "secret.json").is_file():
        raise FileNotFoundError(f"no stack in {data_dir}; run 'cellpose-finetuning serve' first")
    click.echo(stack.token(user, expires_in=expires_in))


@main.command()
@_stack_options
@click.option(
    "--timeout", type=float, default=10.0, show_default=True, help="Seconds each check may take."
)
def health(data_dir: Path, timeout: float) -> None:
    """Check a running 'serve': Hypha, S3 and the service; JSON, exit code 0 when all answer.

    \b
    Exit codes: 0 every part answers, 1 a part is down or nothing serves
    from --data-dir. For a supervisor or a container's HEALTHCHECK:
      cellpose-finetuning health --data-dir /srv/cellpose
    """
    import asyncio

    from cellpose_finetuning.deploy.health import check_health

    report = asyncio.run(check_health(data_dir, timeout=timeout))
    click.echo(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else EXIT_FAILED)


# --------------------------------------------------------------------------- remote
@main.group()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Read server URL, service id and token from this stack's connection.json.",
)
@click.option("--server-url", envvar="HYPHA_SERVER_URL", default=None)
@click.option("--token", envvar="HYPHA_TOKEN", default=None)
@click.option(
    "--service-id",
    envvar="CELLPOSE_SERVICE_ID",
    default="bioimage-io/cellpose-finetuning",
    show_default=True,
)
@click.pass_context
def remote(
    ctx: click.Context,
    data_dir: Path | None,
    server_url: str | None,
    token: str | None,
    service_id: str,
) -> None:
    """Use a running service (upload, train, status, stop, infer).

    \b
    Examples:
      cellpose-finetuning remote --data-dir ~/.cellpose-finetuning upload data/ --alias my-data
      cellpose-finetuning remote train --artifact ws-user-local-user/my-data \
          --train-images images/train/ --train-annotations annotations/train/ --n-epochs 10
    """
    if data_dir is not None:
        from cellpose_finetuning.deploy.serve import read_connection_file

        conn = read_connection_file(data_dir)
        server_url = server_url or conn["server_url"]
        token = token or conn.get("token")
        service_id = conn.get("service_id", service_id)
    if not server_url:
        raise click.UsageError("give --server-url (or HYPHA_SERVER_URL) or --data-dir")
    ctx.obj = {"server_url": server_url, "token": token, "service_id": service_id}


def _run_connected(
    open_connection: Callable[[], Any], body: Callable[..., Any], with_service: bool
) -> Any:
    """Open a connection, run ``body`` on it, close it; remote errors become one line."""
    import asyncio

    async def go() -> Any:
        opened = await open_connection()
        server = opened[0] if with_service else opened
        try:
            return await (body(*opened) if with_service else body(server))
        finally:
            await server.disconnect()

    try:
        return asyncio.run(go())
    except Exception as exc:
        if isinstance(exc, click.ClickException | CellposeFinetuningError):
            raise
        raise click.ClickException(_remote_message(exc)) from None


def _remote_run(ctx: click.Context, body: Callable[[Any, Any], Any]) -> Any:
    from cellpose_finetuning.client import connect

    def open_connection() -> Any:
        return connect(
            ctx.obj["server_url"], token=ctx.obj["token"], service_id=ctx.obj["service_id"]
        )

    return _run_connected(open_connection, body, with_service=True)


def _remote_message(exc: Exception) -> str:
    """The service's one-line message out of a hypha-rpc RemoteException's text."""
    import re

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        match = re.match(r"^(?:\w+\.)*\w*(?:Error|Exception): (.+)$", line)
        if match:
            return match.group(1)
    return lines[-1] if lines else repr(exc)


@remote.command("upload")
@click.argument("folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--alias", required=True, help="Dataset name (artifact alias).")
@click.option("--public", is_flag=True, help="Readable by everyone.")
@click.pass_context
def remote_upload(ctx: click.Context, folder: Path, alias: str, public: bool) -> None:
    """Upload a folder of images and masks as a dataset artifact; prints its id.

    \b
    Example:
      cellpose-finetuning remote upload data/ --alias my-data
    """
    from tqdm import tqdm

    from cellpose_finetuning.client import upload_folder

    async def body(server: Any, _svc: Any) -> str:
        with tqdm(unit="file", desc="upload") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            return await upload_folder(
                server, folder, alias=alias, public=public, progress=progress
            )

    click.echo(_remote_run(ctx, body))


@remote.command("train")
@click.option("--artifact", required=True, help="Dataset: workspace/alias or artifact URL.")
@click.option("--train-images", required=True)
@click.option("--train-annotations", required=True)
@click.option("--test-images", default=None)
@click.option("--test-annotations", default=None)
@click.option("--model", default="cpsam", show_default=True)
@click.option("--n-epochs", type=int, default=10, show_default=True)
@click.option("--learning-rate", type=float, default=1e-6, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--validation-interval", type=int, default=None)
@click.option("--n-samples", type=int, default=None)
@click.option("--detach", is_flag=True, help="Print the session id and return.")
@click.option("--json", "as_json", is_flag=True)
@_recipe_options
@click.pass_context
def remote_train(ctx: click.Context, detach: bool, as_json: bool, **kwargs: Any) -> None:
    """Start training on the service and follow it with a progress bar.

    \b
    Example:
      cellpose-finetuning remote train --artifact ws-user-me/my-data \
          --train-images 'images/*.tif' --train-annotations 'masks/*_mask.tif'
    """
    from cellpose_finetuning.client import follow

    kwargs = {k: v for k, v in kwargs.items() if v is not None}

    async def body(_server: Any, svc: Any) -> dict[str, Any]:
        started = await svc.start_training(**kwargs)
        for warning in started.get("warnings", []):
            click.echo(f"Warning: {warning}", err=True)
        if detach:
            return started
        return await follow(svc, started["session_id"], show_progress=not as_json)

    status = _remote_run(ctx, body)
    if as_json or detach:
        click.echo(json.dumps(status, indent=1, default=str))
    else:
        click.echo(
            f"[{status['status_type']}] {status['message']}\nSession: {status['session_id']}"
        )
        base, final = status.get("base_instance_metrics"), status.get("instance_metrics")
        if base and final:
            from cellpose_finetuning.engine.metrics import ap_change
            from cellpose_finetuning.engine.schemas import InstanceMetrics

            change = ap_change(InstanceMetrics(**base), InstanceMetrics(**final))
            click.echo(f"Fine-tuning on the test set: {change}")
    if status.get("status_type") == "failed":
        sys.exit(EXIT_FAILED)


@remote.command("status")
@click.argument("session_id")
@click.pass_context
def remote_status(ctx: click.Context, session_id: str) -> None:
    """Print a session's status as JSON.

    \b
    Example:
      cellpose-finetuning remote status 20261125-101500-ab12cd34
    """

    async def body(_server: Any, svc: Any) -> Any:
        return await svc.get_training_status(session_id)

    click.echo(json.dumps(_remote_run(ctx, body), indent=1, default=str))


@remote.command("stop")
@click.argument("session_id")
@click.pass_context
def remote_stop(ctx: click.Context, session_id: str) -> None:
    """Stop a session after the current batch.

    \b
    Example:
      cellpose-finetuning remote stop 20261125-101500-ab12cd34
    """

    async def body(_server: Any, svc: Any) -> Any:
        return await svc.stop_training(session_id)

    click.echo(_remote_run(ctx, body)["status_type"])


@remote.command("export")
@click.argument("session_id")
@click.option("--name", "model_name", required=True, help="Artifact alias for the model.")
@click.option("--collection", default="bioimage-io/colab-annotations", show_default=True)
@click.option(
    "--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True
)
@click.pass_context
def remote_export(
    ctx: click.Context, session_id: str, model_name: str, collection: str, checkpoint: str
) -> None:
    """Publish one of your sessions on the service as a BioImage.IO model.

    \b
    Example:
      cellpose-finetuning remote export 20261125-101500-ab12cd34 --name my-nuclei-v1
    """

    async def body(_server: Any, svc: Any) -> Any:
        return await svc.export_model(
            session_id=session_id,
            model_name=model_name,
            collection=collection,
            checkpoint=checkpoint,
        )

    click.echo(json.dumps(_remote_run(ctx, body), indent=1, default=str))


@remote.command("infer")
@click.option("--model", default="cpsam", show_default=True)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--diameter", type=float, default=None)
@click.option(
    "--save",
    multiple=True,
    type=click.Choice([*_SAVE_FORMATS, "all"]),
    default=("tif",),
    show_default=True,
    help="Output formats, repeatable (as for `infer`).",
)
@click.pass_context
def remote_infer(
    ctx: click.Context,
    model: str,
    images: tuple[Path, ...],
    out: Path,
    diameter: float | None,
    save: tuple[str, ...],
) -> None:
    """Send local images to the service and write the masks (TIFF, and the --save formats).

    \b
    Example:
      cellpose-finetuning remote infer --model SESSION_ID img.tif --out masks/ --save seg
    """
    from cellpose_finetuning.io.annotations import write_outputs
    from cellpose_finetuning.io.images import read_image

    arrays = [read_image(p) for p in images]

    async def body(_server: Any, svc: Any) -> Any:
        return await svc.infer(model=model, input_arrays=arrays, diameter=diameter)

    for path, result in zip(images, _remote_run(ctx, body), strict=True):
        written = write_outputs(out, path.name, result["output"], _save_formats(save))
        click.echo(f"{path} -> {', '.join(str(p) for p in written.values())}")


@remote.command("evaluate")
@click.option("--model", "models", multiple=True, required=True, help="Repeat per model.")
@click.option("--artifact", required=True, help="The labelled dataset artifact.")
@click.option("--test-images", required=True, help="Folder ending in '/' or a pattern.")
@click.option("--test-annotations", required=True, help="Masks, same form.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def remote_evaluate(
    ctx: click.Context,
    models: tuple[str, ...],
    artifact: str,
    test_images: str,
    test_annotations: str,
    out: Path | None,
) -> None:
    """Score models on a dataset artifact with the service; print the tables.

    \b
    Example:
      cellpose-finetuning remote evaluate --model tiny --model SESSION_ID \\
          --artifact ws-user-me/my-data --test-images images/test/ \\
          --test-annotations annotations/test/ --out eval/
    """
    from cellpose_finetuning.client import evaluate as evaluate_remote

    async def body(_server: Any, svc: Any) -> Any:
        return await evaluate_remote(
            svc,
            list(models),
            artifact=artifact,
            test_images=test_images,
            test_annotations=test_annotations,
            out=out,
        )

    click.echo(_remote_run(ctx, body)["markdown"])


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


@main.command()
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
@click.option("--diameter", type=float, default=None, help="Object diameter (default: none).")
@click.option("--flow-threshold", type=float, default=0.4, show_default=True)
@click.option("--cellprob-threshold", type=float, default=0.0, show_default=True)
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly_errors
def evaluate(
    models: tuple[str, ...],
    images: str,
    annotations: str,
    out: Path,
    diameter: float | None,
    flow_threshold: float,
    cellprob_threshold: float,
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
    from cellpose_finetuning.engine.evaluation import (
        evaluate_predictors,
        load_labelled,
        write_report,
    )
    from cellpose_finetuning.engine.schemas import InferenceSettings

    settings = InferenceSettings(
        diameter=diameter, flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold
    )
    pairs = _local_pairs(images, annotations, "--images", "--annotations")
    data = load_labelled(pairs)
    report, predictions = evaluate_predictors(_predictors(models, settings, device), data, settings)
    files = write_report(report, data, predictions, out)
    if as_json:
        click.echo(report.model_dump_json(indent=1))
        return
    click.echo(report.to_markdown())
    for kind, path in files.items():
        click.echo(f"{kind:9s}: {path}")


# --------------------------------------------------------------------------- demo
#: The demo's run: the tiny network from scratch on the dev nuclei (recipe "from-scratch").
DEMO_IMAGES = "nuclei_*.tif"


@main.command()
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A folder with images/{train,test}/ and annotations/{train,test}/ "
    "[default: the sample images shipped in the package].",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
)
@click.option(
    "--images",
    "pattern",
    default=DEMO_IMAGES,
    show_default=True,
    help="Which images of the train and test folders to use ('*.tif': all, with the bacteria).",
)
@click.option("--n-epochs", type=int, default=None, help="Default: the recipe's.")
@click.option("--seed", type=int, default=0, show_default=True)
@_friendly_errors
def demo(data: Path | None, workdir: Path, pattern: str, n_epochs: int | None, seed: int) -> None:
    """Train the tiny network from scratch on the dev nuclei and show what it learnt.

    Uses recipe 'from-scratch', then scores the untrained and the trained
    network on the test images (evaluation.md, per_image_ap.png and
    overlays.png under WORKDIR/evaluation/). The last line is the change in
    AP@0.5 and the time it took. Seeded: the same numbers on every run on
    the same machine.

    \b
    Example:
      cellpose-finetuning demo --workdir runs/demo
    """
    import shutil

    import torch

    if data is None:
        from cellpose_finetuning.sample_data import sample_data_dir

        data = sample_data_dir()
    t0 = time.perf_counter()
    ctx = click.get_current_context()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model = workdir / "tiny.pth"
    ctx.invoke(init_model, preset="tiny", out=model, seed=0)
    ctx.invoke(
        train,
        train_images=f"{data}/images/train/{pattern}",
        train_annotations=f"{data}/annotations/train/{pattern}",
        test_images=f"{data}/images/test/{pattern}",
        test_annotations=f"{data}/annotations/test/{pattern}",
        model=str(model),
        recipe="from-scratch",
        n_epochs=n_epochs,
        seed=seed,
        out=workdir / "session",
    )
    trained = time.perf_counter() - t0
    ctx.invoke(
        evaluate,
        models=(str(model), str(workdir / "session")),
        images=f"{data}/images/test/{pattern}",
        annotations=f"{data}/annotations/test/{pattern}",
        out=workdir / "evaluation",
    )
    status = _open_session(workdir / "session").read_status()
    from cellpose_finetuning.engine.metrics import ap_change

    click.echo(
        f"Demo: {ap_change(status.base_instance_metrics, status.instance_metrics)} on the test "
        f"images; training {trained:.0f} s, all {time.perf_counter() - t0:.0f} s "
        f"({torch.get_num_threads()} torch threads)"
    )


# --------------------------------------------------------------------------- bioengine
@main.group("bioengine")
@click.option("--server-url", envvar="HYPHA_SERVER_URL", required=True, help="Hypha server.")
@click.option("--workspace", default=None, help="Workspace (default: the token's own).")
@click.option(
    "--token", default=None, help="Token (default: $HYPHA_TOKEN, or HYPHA_TOKEN= in .env)."
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".env"),
    show_default=True,
)
@click.pass_context
def bioengine_group(
    ctx: click.Context, server_url: str, workspace: str | None, token: str | None, env_file: Path
) -> None:
    """Ship the service as a BioEngine app: upload the app folder, deploy, redeploy.

    \b
    Examples:
      cellpose-finetuning bioengine --server-url https://hypha.aicell.io upload
      cellpose-finetuning bioengine --server-url https://hypha.aicell.io deploy \\
          --worker-service-id bioimage-io/bioengine-worker
      cellpose-finetuning bioengine --server-url https://hypha.aicell.io redeploy \\
          --worker-service-id bioimage-io/bioengine-worker --application-id cellpose-finetuning-app
    """
    import warnings

    from cellpose_finetuning.deploy.bioengine import TokenWarning, load_token

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TokenWarning)
        try:
            resolved = load_token(token, env_file)
        except CellposeFinetuningError as exc:
            raise click.UsageError(str(exc)) from None
    for w in caught:
        click.echo(f"Warning: {w.message}", err=True)
    ctx.obj = {"server_url": server_url, "workspace": workspace, "token": resolved}


def _bioengine_run(ctx: click.Context, body: Callable[[Any], Any]) -> Any:
    from hypha_rpc import connect_to_server

    config = {"server_url": ctx.obj["server_url"], "token": ctx.obj["token"]}
    if ctx.obj["workspace"]:
        config["workspace"] = ctx.obj["workspace"]
    return _run_connected(lambda: connect_to_server(config), body, with_service=False)


_APP_DIR = click.option(
    "--app-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("bioengine-app"),
    show_default=True,
    help="The app folder (manifest.yaml, entry module).",
)


@bioengine_group.command("upload")
@_APP_DIR
@click.option(
    "--wheel",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Upload this wheel instead of building one from the source checkout.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@_friendly_errors
def bioengine_upload(ctx: click.Context, app_dir: Path, wheel: Path | None, as_json: bool) -> None:
    """Validate the app folder and upload it, with this package's wheel, as an app artifact."""
    from cellpose_finetuning.deploy.bioengine import upload_app

    result = _bioengine_run(ctx, lambda server: upload_app(server, app_dir, wheel=wheel))
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(f"uploaded {result['artifact_id']} (version {result['version']})")


def _deploy_options(func: F) -> F:
    for option in reversed(
        [
            click.option(
                "--worker-service-id",
                required=True,
                help="The BioEngine worker's service id (workspace/service).",
            ),
            click.option(
                "--artifact-id", default=None, help="App artifact (default: <workspace>/<id>)."
            ),
            _APP_DIR,
            click.option("--disable-gpu", is_flag=True, default=None, help="Run on CPU only."),
            click.option("--max-concurrent-trainings", type=int, default=None, help="App setting."),
            click.option("--training-on-ray", is_flag=True, default=None, help="App setting."),
        ]
    ):
        func = option(func)
    return func


def _deploy(ctx: click.Context, redeploy: bool, application_id: str | None, **kw: Any) -> None:
    from cellpose_finetuning.deploy.bioengine import deploy_app, read_manifest

    app_kwargs = {
        k: kw[k] for k in ("max_concurrent_trainings", "training_on_ray") if kw[k] is not None
    }

    async def body(server: Any) -> str:
        artifact_id = kw["artifact_id"] or (
            f"{server.config.workspace}/{read_manifest(kw['app_dir'])['id']}"
        )
        return await deploy_app(
            server,
            kw["worker_service_id"],
            artifact_id,
            token=ctx.obj["token"],
            application_id=application_id,
            disable_gpu=kw["disable_gpu"],
            application_kwargs=app_kwargs,
            redeploy=redeploy,
        )

    app_id = _bioengine_run(ctx, body)
    click.echo(f"{'redeployed' if redeploy else 'deployed'} application {app_id}")


@bioengine_group.command("deploy")
@_deploy_options
@click.option(
    "--application-id",
    default="cellpose-finetuning-app",
    show_default=True,
    help="Name of the deployment (not 'cellpose-finetuning': the app registers that service).",
)
@click.pass_context
@_friendly_errors
def bioengine_deploy(ctx: click.Context, application_id: str, **kw: Any) -> None:
    """Deploy the uploaded app on a BioEngine worker (with your token as its HYPHA_TOKEN)."""
    _deploy(ctx, False, application_id, **kw)


@bioengine_group.command("redeploy")
@_deploy_options
@click.option("--application-id", required=True, help="The running deployment to update.")
@click.pass_context
@_friendly_errors
def bioengine_redeploy(ctx: click.Context, application_id: str, **kw: Any) -> None:
    """Update a running deployment to the latest upload (and a fresh token)."""
    _deploy(ctx, True, application_id, **kw)


def run() -> None:  # pragma: no cover - console entry point alias
    """Console entry point."""
    main(prog_name=os.path.basename(sys.argv[0]) or "cellpose-finetuning")


if __name__ == "__main__":  # pragma: no cover
    main()
