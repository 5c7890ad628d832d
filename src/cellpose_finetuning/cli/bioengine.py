"""``bioengine``: ship the service as a BioEngine app (upload, deploy, redeploy)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cellpose_finetuning.cli.options import friendly_errors
from cellpose_finetuning.cli.remote import run_connected
from cellpose_finetuning.errors import CellposeFinetuningError
from cellpose_finetuning.names import APP_ID, SERVICE_ID

F = TypeVar("F", bound=Callable[..., Any])


@click.group("bioengine")
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
    return run_connected(lambda: connect_to_server(config), body, with_service=False)


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
@friendly_errors
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
    default=APP_ID,
    show_default=True,
    help=f"Name of the deployment (not '{SERVICE_ID}': the app registers that service).",
)
@click.pass_context
@friendly_errors
def bioengine_deploy(ctx: click.Context, application_id: str, **kw: Any) -> None:
    """Deploy the uploaded app on a BioEngine worker (with your token as its HYPHA_TOKEN)."""
    _deploy(ctx, False, application_id, **kw)


@bioengine_group.command("redeploy")
@_deploy_options
@click.option("--application-id", required=True, help="The running deployment to update.")
@click.pass_context
@friendly_errors
def bioengine_redeploy(ctx: click.Context, application_id: str, **kw: Any) -> None:
    """Update a running deployment to the latest upload (and a fresh token)."""
    _deploy(ctx, True, application_id, **kw)
