"""The service's own stack: ``serve``, ``token`` and ``health``.

``serve`` runs the service on its embedded local stack (SeaweedFS + Hypha),
or registers it on an existing Hypha server; ``token`` mints a user's token
for that stack; ``health`` checks that every part of it answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from cellpose_finetuning.cli.options import (
    EXIT_FAILED,
    data_dir_option,
    friendly_errors,
    settings_option,
)
from cellpose_finetuning.names import (
    DEFAULT_HYPHA_PORT,
    DEFAULT_S3_PORT,
    DEFAULT_USER,
    USER_TOKEN_LIFETIME_S,
    WEED_FILER_PORT,
    WEED_MASTER_PORT,
    WEED_VOLUME_PORT,
)
from cellpose_finetuning.service.config import ServiceConfig


def _fields(config: type, options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Pop from ``options`` the values of ``config``'s fields (``field`` or ``prefix+field``)."""
    names = (
        list(config.model_fields)
        if hasattr(config, "model_fields")
        else [f.name for f in dataclasses.fields(config)]
    )
    out = {}
    for name in names:
        for key in (name, prefix + name):
            if key in options:
                out[name] = options.pop(key)
    return out


@click.command()
@data_dir_option
@click.option("--hypha-port", type=int, default=DEFAULT_HYPHA_PORT, show_default=True)
@click.option("--s3-port", type=int, default=DEFAULT_S3_PORT, show_default=True)
@click.option("--weed-master-port", type=int, default=WEED_MASTER_PORT, show_default=True)
@click.option("--weed-volume-port", type=int, default=WEED_VOLUME_PORT, show_default=True)
@click.option("--weed-filer-port", type=int, default=WEED_FILER_PORT, show_default=True)
@click.option(
    "--user",
    default=DEFAULT_USER,
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
@settings_option(ServiceConfig, "max_concurrent_trainings")
@settings_option(ServiceConfig, "max_active_sessions_per_user")
@settings_option(ServiceConfig, "max_epochs")
@settings_option(ServiceConfig, "max_pixels")
@settings_option(ServiceConfig, "max_blockwise_pixels")
@settings_option(ServiceConfig, "max_files")
@settings_option(ServiceConfig, "max_sessions_per_user")
@settings_option(ServiceConfig, "max_waiting_infers_per_user")
@settings_option(ServiceConfig, "direct_s3_reads")
@settings_option(ServiceConfig, "cache_max_bytes")
@settings_option(ServiceConfig, "job_result_ttl_hours")
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
@friendly_errors
def serve(
    data_dir: Path,
    user: str,
    server_url: str | None,
    workspace: str | None,
    token: str | None,
    training_time_slice: float,
    backend: str,
    **options: Any,
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
    from cellpose_finetuning.deploy.ray_backend import RayOptions

    # Every other option is a field of one of three configurations, by name
    # (the Ray ones may carry a "ray_" prefix): nothing is copied by hand.
    service_config = _fields(ServiceConfig, options)
    service_config["training_time_slice_s"] = (
        None if training_time_slice < 0 else training_time_slice
    )
    stack = StackConfig(data_dir=data_dir, **_fields(StackConfig, options))
    ray_options = RayOptions(**_fields(RayOptions, options, prefix="ray_"))
    assert not options, f"serve options without a home: {sorted(options)}"
    serve_options = ServeOptions(
        data_dir=data_dir,
        stack=None if server_url else stack,
        server_url=server_url,
        workspace=workspace,
        token=token,
        user=user,
        service_config=service_config,
        backend=backend,
        ray=ray_options if backend == "ray" else None,
    )
    result = asyncio.run(run_serve(serve_options, own_process=True))
    if result["forced"]:
        # A second signal asked for a fast stop and every child is gone: skip
        # the exit hooks (Ray's would wait for the processes killed above).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@click.command()
@data_dir_option
@click.option("--user", required=True, help="User id; their workspace is ws-user-<id>.")
@click.option(
    "--expires-in",
    type=int,
    default=USER_TOKEN_LIFETIME_S,
    show_default=True,
    help="Lifetime in seconds.",
)
@friendly_errors
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


@click.command()
@data_dir_option
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
