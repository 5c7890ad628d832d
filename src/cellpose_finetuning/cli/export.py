"""``export``: a session as a BioImage.IO model package, optionally published."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cellpose_finetuning.cli.options import friendly_errors, settings_option
from cellpose_finetuning.engine.schemas import InferenceSettings
from cellpose_finetuning.names import DEFAULT_COLLECTION


@click.command("export")
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
@settings_option(
    InferenceSettings, "flow_threshold", help="Flow error threshold, baked into the exported model."
)
@settings_option(
    InferenceSettings,
    "cellprob_threshold",
    help="Cell probability cut, baked into the exported model.",
)
@click.option(
    "--publish",
    "publish",
    default=None,
    metavar="COLLECTION",
    help=f"Also upload the package to this collection (e.g. {DEFAULT_COLLECTION}) with your "
    "own token.",
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
@friendly_errors
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

    from cellpose_finetuning.cli.remote import remote_message
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
        raise click.ClickException(remote_message(exc)) from None
