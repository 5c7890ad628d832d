"""Command line: train, watch, stop, continue and use models on local folders.

Built on click (argument parsing, help pages) and tqdm (progress bars).
Errors print as one line and exit non-zero; ``--verbose`` adds the traceback.

One module per command group: :mod:`.training` (init-model, train, continue,
status, stop; :mod:`.following` shows a run), :mod:`.inference` (infer, evaluate), :mod:`.export`,
:mod:`.stack` (serve, token, health), :mod:`.remote`, :mod:`.demo` and
:mod:`.bioengine`; :mod:`.options` makes the options of the settings models.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from cellpose_finetuning.cli.bioengine import bioengine_group
from cellpose_finetuning.cli.demo import demo
from cellpose_finetuning.cli.export import export
from cellpose_finetuning.cli.inference import evaluate, infer
from cellpose_finetuning.cli.options import EXIT_FAILED, EXIT_USER_ERROR
from cellpose_finetuning.cli.remote import remote
from cellpose_finetuning.cli.stack import health, serve, token
from cellpose_finetuning.cli.training import continue_, init_model, status, stop, train

__all__ = ["EXIT_FAILED", "EXIT_USER_ERROR", "main", "run"]


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


# In the order of `--help` before the split (click lists them sorted by name anyway).
for _command in (
    init_model,
    train,
    continue_,
    status,
    stop,
    infer,
    export,
    serve,
    token,
    health,
    remote,
    evaluate,
    demo,
    bioengine_group,
):
    main.add_command(_command)
del _command


def run() -> None:  # pragma: no cover - console entry point alias
    """Console entry point."""
    main(prog_name=os.path.basename(sys.argv[0]) or "cellpose-finetuning")
