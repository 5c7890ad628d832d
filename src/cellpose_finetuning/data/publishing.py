"""Model artifacts in a collection: publish a built package, list a collection's children.

The artifact manager's side of the service's ``export_model`` and
``list_models_by_dataset`` (:mod:`cellpose_finetuning.service.publishing`) and
of the client's ``publish_package``; files go up through
:func:`~cellpose_finetuning.data.artifacts.upload_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellpose_finetuning.data.artifacts import PAGE, upload_files

__all__ = ["list_children", "publish_package"]


async def publish_package(
    artifact_manager: Any,
    package_dir: Path,
    *,
    collection: dict[str, Any],
    alias: str,
    server_url: str,
    training_dataset_id: str | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Upload a built BioImage.IO package folder as a model artifact of ``collection``.

    The one publishing path: the service's ``export_model`` (with its own
    connection, after its permission checks) and the client's
    ``publish_package`` (with the caller's connection) both end here.

    Parameters
    ----------
    artifact_manager : Any
        hypha-rpc proxy of ``public/artifact-manager``.
    package_dir : Path
        The package folder (``rdf.yaml`` and the files it names).
    collection : dict
        The collection's record (``id`` and ``workspace``).
    alias : str
        The model artifact's alias (its name in the collection's workspace).
    server_url : str
        Public server URL, for the returned links.
    training_dataset_id : str, optional
        Recorded in the manifest and config, so ``list_models_by_dataset`` finds it.
    manifest_extra : dict, optional
        More manifest keys (who exported it, from which session).

    Returns
    -------
    dict
        ``export_model``'s keys: artifact_id, model_name, status, artifact_url,
        download_url, files.
    """
    import yaml

    package_dir = Path(package_dir)
    manifest = yaml.safe_load((package_dir / "rdf.yaml").read_text())
    if training_dataset_id:
        manifest["training_dataset_id"] = training_dataset_id
    manifest.update(manifest_extra or {})
    art = await artifact_manager.create(
        parent_id=collection["id"],
        alias=alias,
        type="model",
        stage=True,
        manifest=manifest,
        config={"training_dataset_id": training_dataset_id} if training_dataset_id else {},
    )
    names = await upload_files(
        artifact_manager, art["id"], {p.name: p for p in package_dir.iterdir() if p.is_file()}
    )
    url = f"{server_url.rstrip('/')}/{collection['workspace']}/artifacts/{alias}"
    return {
        "artifact_id": art["id"],
        "model_name": alias,
        "status": "exported",
        "artifact_url": url,
        "download_url": f"{url}/create-zip-file",
        "files": names,
    }


async def list_children(
    artifact_manager: Any,
    parent_id: str,
    *,
    filters: dict[str, Any] | None = None,
    order_by: str | None = None,
    page: int = PAGE,
) -> list[dict[str, Any]]:
    """Every child artifact of a collection, page by page, as plain dicts.

    Parameters
    ----------
    artifact_manager : Any
        hypha-rpc proxy of ``public/artifact-manager``.
    parent_id : str
        The collection.
    filters, order_by : optional
        Passed to the artifact manager's ``list``.
    page : int
        Children asked for per call.
    """
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        items = [
            dict(item)
            for item in await artifact_manager.list(
                parent_id, filters=filters, offset=offset, limit=page, order_by=order_by
            )
        ]
        out.extend(items)
        if len(items) < page:
            return out
        offset += page
