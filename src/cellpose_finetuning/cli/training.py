"""Local training: ``init-model``, ``train``, ``continue``, ``status``, ``stop``.

A run is a session directory; its worker process trains while the command
follows it with a progress bar (Ctrl-C asks the run to stop).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from cellpose_finetuning.cli.following import echo_warnings, follow, report
from cellpose_finetuning.cli.options import friendly_errors, recipe_options, settings_option
from cellpose_finetuning.engine.schemas import TrainingSettings


# --------------------------------------------------------------------------- init-model
@click.command("init-model")
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
@friendly_errors
def init_model(preset: str, out: Path, seed: int) -> None:
    """Write an untrained network of cellpose's own Transformer class.

    \b
    Example:
      cellpose-finetuning init-model --preset tiny --out tiny.pth
    """
    click.echo(write_untrained(preset, out, seed))


def write_untrained(preset: str, out: Path, seed: int = 0) -> str:
    """Write an untrained ``preset`` network to ``out``; returns the line to show."""
    import torch

    from cellpose_finetuning.engine.models import PRESETS, build_network, save_network

    torch.manual_seed(seed)
    net = build_network(PRESETS[preset])
    save_network(net, PRESETS[preset], out)
    n_params = sum(p.numel() for p in net.parameters())
    return f"Wrote {out} ({preset}, {n_params:,} parameters)"


# --------------------------------------------------------------------------- helpers
def local_pairs(images: str, annotations: str, images_arg: str, annotations_arg: str) -> list:
    """(image, mask) pairs of two local specs (folders or patterns)."""
    from cellpose_finetuning.data.local import pair_local_specs

    return pair_local_specs(
        images, annotations, images_arg=images_arg, annotations_arg=annotations_arg
    )


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
    return local_pairs(test_images, test_annotations, "--test-images", "--test-annotations")


def open_session(path: Path) -> Any:
    """The session stored in directory ``path``."""
    from cellpose_finetuning.engine.sessions import SessionStore

    path = Path(path)
    return SessionStore(path.parent if str(path.parent) else ".").get(path.name)


def run_local_training(
    settings: dict[str, Any],
    *,
    train_images: str,
    train_annotations: str,
    test_images: str | None,
    test_annotations: str | None,
    out: Path,
    detach: bool = False,
    as_json: bool = False,
) -> None:
    """Create session ``out`` and train it in a worker, following it unless ``detach``."""
    from cellpose_finetuning.engine.runs import create_local_session
    from cellpose_finetuning.engine.training import start_worker

    session = create_local_session(
        out=out,
        train_pairs=local_pairs(
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
    echo_warnings(session)
    worker = start_worker(session)
    if detach:
        click.echo(f"Started {session.path} (worker pid {worker.pid})")
        return
    report(follow(session, worker, as_json), session, as_json)


# --------------------------------------------------------------------------- train
@click.command()
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
@settings_option(
    TrainingSettings,
    "model",
    "--model",
    "--pretrained_model",
    help="Base model: 'cpsam', a .pth checkpoint, or a session directory.",
)
@settings_option(TrainingSettings, "n_epochs", "--n-epochs", "--n_epochs")
@settings_option(TrainingSettings, "learning_rate", "--learning-rate", "--learning_rate")
@settings_option(TrainingSettings, "weight_decay", "--weight-decay", "--weight_decay")
@settings_option(TrainingSettings, "validation_interval")
@settings_option(
    TrainingSettings,
    "n_samples",
    type=int,  # the CLI takes a count; the service also takes a fraction
    help="Random subset of training pairs (a count; the seed is recorded). Default: all.",
)
@settings_option(TrainingSettings, "batch_size")
@settings_option(TrainingSettings, "min_train_masks", "--min-train-masks", "--min_train_masks")
@settings_option(TrainingSettings, "seed")
@settings_option(TrainingSettings, "device", help="Torch device (default: cuda, mps or cpu).")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Session directory to create.",
)
@click.option("--detach", is_flag=True, help="Start the run and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@recipe_options
@friendly_errors
def train(
    train_images: str | None,
    train_annotations: str | None,
    test_images: str | None,
    test_annotations: str | None,
    cp_dir: Path | None,
    cp_test_dir: Path | None,
    mask_filter: str,
    out: Path,
    detach: bool,
    as_json: bool,
    recipe: str | None = None,
    **values: Any,
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
    from cellpose_finetuning.engine.recipes import apply_recipe

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

    run_local_training(
        apply_recipe(values, recipe),  # its defaults are the contract's
        train_images=train_images,
        train_annotations=train_annotations,
        test_images=test_images,
        test_annotations=test_annotations,
        out=out,
        detach=detach,
        as_json=as_json,
    )


def train_defaults() -> dict[str, Any]:
    """The training settings ``train`` passes when no option is given (its defaults)."""
    fields = TrainingSettings.model_fields
    return {p.name: p.default for p in train.params if p.name in fields and p.name != "recipe"}


# --------------------------------------------------------------------------- continue
@click.command("continue")
@click.argument("session_dir", type=click.Path(file_okay=False, path_type=Path))
@settings_option(
    TrainingSettings,
    "n_epochs",
    default=None,  # the session decides
    help="Epochs to add (default: the session's n_epochs; a stopped or failed run "
    "first finishes its planned epochs).",
)
@click.option("--detach", is_flag=True, help="Start and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@friendly_errors
def continue_(session_dir: Path, n_epochs: int | None, detach: bool, as_json: bool) -> None:
    """Continue a completed, stopped or failed session from its last weights.

    \b
    Example:
      cellpose-finetuning continue runs/first --n-epochs 5
    """
    from cellpose_finetuning.engine.training import continue_session, start_worker

    session = open_session(session_dir)
    continue_session(session, n_epochs)
    worker = start_worker(session, resume=True)
    if detach:
        click.echo(f"Continuing {session.path} (worker pid {worker.pid})")
        return
    report(follow(session, worker, as_json), session, as_json)


# --------------------------------------------------------------------------- status, stop
@click.command()
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
@friendly_errors
def status(session_dir: Path, plot: Path | None) -> None:
    """Print a session's status as JSON (the service's get_training_status).

    \b
    Example:
      cellpose-finetuning status runs/first --plot
    """
    session = open_session(session_dir)
    st = session.read_status()
    click.echo(st.model_dump_json(indent=1))
    if plot is not None:
        from cellpose_finetuning.engine.plots import plot_training_curves

        target = session.curves_file if str(plot) == "-" else plot
        click.echo(f"Curves: {plot_training_curves(st, target)}", err=True)


@click.command()
@click.argument("session_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Wait until the run has stopped."
)
@friendly_errors
def stop(session_dir: Path, wait: bool) -> None:
    """Ask a running session to stop after the current batch, keeping its weights.

    \b
    Example:
      cellpose-finetuning stop runs/first
    """
    from cellpose_finetuning.engine.schemas import TERMINAL_STATES

    session = open_session(session_dir)
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
