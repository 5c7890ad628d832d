"""``demo``: train the tiny network from scratch on the dev nuclei and score it."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cellpose_finetuning.cli.options import friendly_errors, settings_option
from cellpose_finetuning.engine.schemas import TrainingSettings

#: The demo's run: the tiny network from scratch on the dev nuclei (recipe "from-scratch").
DEMO_IMAGES = "nuclei_*.tif"
DEMO_RECIPE = "from-scratch"


@click.command()
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
@settings_option(
    TrainingSettings,
    "n_epochs",
    default=None,
    help="Default: the recipe's.",  # the recipe decides
)
@settings_option(TrainingSettings, "seed")
@friendly_errors
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

    from cellpose_finetuning.cli.inference import evaluate_models
    from cellpose_finetuning.cli.training import (
        open_session,
        run_local_training,
        train_defaults,
        write_untrained,
    )
    from cellpose_finetuning.engine.metrics import ap_change
    from cellpose_finetuning.engine.recipes import apply_recipe
    from cellpose_finetuning.engine.schemas import InferenceSettings

    if data is None:
        from cellpose_finetuning.sample_data import sample_data_dir

        data = sample_data_dir()
    t0 = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model = workdir / "tiny.pth"
    click.echo(write_untrained("tiny", model, seed=0))
    # What `train --recipe from-scratch --model tiny.pth [--n-epochs N] --seed S` runs.
    given = {"model": str(model), "n_epochs": n_epochs, "seed": seed}
    run_local_training(
        apply_recipe({**train_defaults(), **given}, DEMO_RECIPE),
        train_images=f"{data}/images/train/{pattern}",
        train_annotations=f"{data}/annotations/train/{pattern}",
        test_images=f"{data}/images/test/{pattern}",
        test_annotations=f"{data}/annotations/test/{pattern}",
        out=workdir / "session",
    )
    trained = time.perf_counter() - t0
    evaluate_models(
        (str(model), str(workdir / "session")),
        f"{data}/images/test/{pattern}",
        f"{data}/annotations/test/{pattern}",
        workdir / "evaluation",
        InferenceSettings(),
    )
    status = open_session(workdir / "session").read_status()
    click.echo(
        f"Demo: {ap_change(status.base_instance_metrics, status.instance_metrics)} on the test "
        f"images; training {trained:.0f} s, all {time.perf_counter() - t0:.0f} s "
        f"({torch.get_num_threads()} torch threads)"
    )
