"""``remote``: use a running service (upload, train, status, stop, export, infer, evaluate).

The group reads the server, token and service id once (options, environment,
or a stack's ``connection.json``); each command opens one connection, calls
the service and prints the answer. Remote errors print as one line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cellpose_finetuning.cli.options import (
    EXIT_FAILED,
    recipe_options,
    save_formats,
    save_option,
    settings_option,
)
from cellpose_finetuning.engine.schemas import InferenceSettings, TrainingSettings
from cellpose_finetuning.errors import CellposeFinetuningError
from cellpose_finetuning.names import DEFAULT_COLLECTION, DEFAULT_WORKSPACE, SERVICE_ID


@click.group()
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
    default=f"{DEFAULT_WORKSPACE}/{SERVICE_ID}",
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


def run_connected(
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
        raise click.ClickException(remote_message(exc)) from None


def _remote_run(ctx: click.Context, body: Callable[[Any, Any], Any]) -> Any:
    from cellpose_finetuning.client import connect

    def open_connection() -> Any:
        return connect(
            ctx.obj["server_url"], token=ctx.obj["token"], service_id=ctx.obj["service_id"]
        )

    return run_connected(open_connection, body, with_service=True)


def remote_message(exc: Exception) -> str:
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
@settings_option(TrainingSettings, "model")
@settings_option(TrainingSettings, "n_epochs")
@settings_option(TrainingSettings, "learning_rate")
@settings_option(TrainingSettings, "weight_decay")
@settings_option(TrainingSettings, "validation_interval")
@settings_option(
    TrainingSettings,
    "n_samples",
    type=int,  # a count here; the service's start_training also takes a fraction
    help="Random subset of training pairs (a count). Default: all.",
)
@click.option("--detach", is_flag=True, help="Print the session id and return.")
@click.option("--json", "as_json", is_flag=True)
@recipe_options
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
@click.option("--collection", default=DEFAULT_COLLECTION, show_default=True)
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
@settings_option(InferenceSettings, "diameter")
@save_option("Output formats, repeatable (as for `infer`).")
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
    from cellpose_finetuning.client import infer_files

    async def body(_server: Any, svc: Any) -> Any:
        return await infer_files(
            svc, list(images), out, save=save_formats(save), model=model, diameter=diameter
        )

    for path, written in zip(images, _remote_run(ctx, body), strict=True):
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
