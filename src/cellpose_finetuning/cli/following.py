"""Following a local run: its warnings, a progress bar while it trains, its final report."""

from __future__ import annotations

import sys
from typing import Any

import click

from cellpose_finetuning.cli.options import EXIT_FAILED


def echo_warnings(session: Any) -> None:
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


def follow(session: Any, worker: Any, as_json: bool) -> Any:
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


def report(status: Any, session: Any, as_json: bool) -> None:
    """Print the run's final status (or its JSON); exit 1 when it failed."""
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
