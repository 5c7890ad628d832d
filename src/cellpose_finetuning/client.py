"""A small client for the service: connect, upload a dataset, train, infer.

Only needs ``hypha-rpc`` and ``httpx`` (the ``client`` extra)::

    import asyncio
    from cellpose_finetuning.client import connect, upload_folder, train

    async def main():
        server, svc = await connect("http://127.0.0.1:9527", service_id="...")
        ds = await upload_folder(server, "my-data/", alias="my-dataset")
        status = await train(svc, artifact=ds, train_images="images/train/",
                             train_annotations="annotations/train/", n_epochs=10)

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellpose_finetuning.data.artifacts import upload_files
from cellpose_finetuning.data.publishing import publish_package as _publish

__all__ = [
    "connect",
    "evaluate",
    "follow",
    "infer",
    "infer_files",
    "publish_package",
    "train",
    "upload_folder",
]

TERMINAL = ("completed", "failed", "stopped")


async def connect(
    server_url: str | None = None,
    *,
    token: str | None = None,
    service_id: str | None = None,
) -> tuple[Any, Any]:
    """Connect to Hypha and get the service.

    Parameters
    ----------
    server_url : str, optional
        Default ``$HYPHA_SERVER_URL``.
    token : str, optional
        Default ``$HYPHA_TOKEN`` (none: anonymous).
    service_id : str, optional
        ``workspace/cellpose-finetuning``; default ``$CELLPOSE_SERVICE_ID``.

    Returns
    -------
    (server, service)
    """
    from hypha_rpc import connect_to_server

    server_url = server_url or os.environ["HYPHA_SERVER_URL"]
    token = token or os.environ.get("HYPHA_TOKEN")
    config: dict[str, Any] = {"server_url": server_url}
    if token:
        config["token"] = token
    server = await connect_to_server(config)
    service_id = service_id or os.environ.get("CELLPOSE_SERVICE_ID")
    svc = await server.get_service(service_id) if service_id else None
    return server, svc


async def upload_folder(
    server: Any,
    folder: str | os.PathLike[str],
    *,
    alias: str,
    name: str | None = None,
    public: bool = False,
    concurrency: int = 16,
    progress: Callable[[int, int], Any] | None = None,
) -> str:
    """Upload every file under ``folder`` as a dataset artifact; return its id.

    Presigned upload URLs are asked for in batches of 500 and files are sent
    concurrently. The artifact is private unless ``public``.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{folder}: no files to upload")
    am = await server.get_service("public/artifact-manager")
    config = {"permissions": {"*": "r"}} if public else {}
    ds = await am.create(
        alias=alias,
        type="dataset",
        stage=True,
        manifest={"name": name or alias, "description": f"Uploaded from {folder.name}"},
        config=config,
    )
    await upload_files(
        am,
        ds["id"],
        {p.relative_to(folder).as_posix(): p for p in files},
        concurrency=concurrency,
        progress=progress,
    )
    return ds["id"]


async def follow(
    svc: Any, session_id: str, *, interval: float = 1.0, show_progress: bool = True
) -> dict[str, Any]:
    """Poll a session until it ends, with a tqdm bar; return the final status."""
    from tqdm import tqdm

    bar = tqdm(unit="epoch", disable=not show_progress)
    try:
        while True:
            status = await svc.get_training_status(session_id)
            bar.total = status.get("total_epochs") or bar.total
            bar.n = status.get("current_epoch") or 0
            bar.set_description(status["status_type"])
            losses = status.get("train_losses") or []
            if losses:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.refresh()
            if status["status_type"] in TERMINAL:
                return status
            await asyncio.sleep(interval)
    finally:
        bar.close()


async def train(svc: Any, *, show_progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Start a training session with ``kwargs`` (see ``start_training``) and follow it."""
    started = await svc.start_training(**kwargs)
    return await follow(svc, started["session_id"], show_progress=show_progress)


async def infer(svc: Any, images: list[Any], **kwargs: Any) -> list[Any]:
    """Segment numpy arrays; returns the label images."""
    result = await svc.infer(input_arrays=list(images), **kwargs)
    return [r["output"] for r in result]


async def infer_files(
    svc: Any,
    paths: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    save: tuple[str, ...] | list[str] = ("tif",),
    **kwargs: Any,
) -> list[dict[str, Path]]:
    """Segment local image files and write the results where the tools open them.

    Parameters
    ----------
    svc : service proxy
        From :func:`connect`.
    paths : list of path-like
        Image files (any format :func:`~cellpose_finetuning.io.images.read_image` reads).
    out : path-like
        Folder for the results; names keep each image's whole stem (``a.1_masks.tif``).
    save : sequence of str
        Any of ``tif`` (``_masks.tif``), ``seg`` (cellpose GUI ``_seg.npy``),
        ``png`` (``_cp_masks.png``), ``rois`` (Fiji ``_rois.zip``), ``geojson``
        (QuPath ``.geojson``).
    **kwargs
        ``infer`` arguments (``model``, ``diameter``...). With ``seg`` in
        ``save``, ``return_flows`` defaults to True: the ``_seg.npy`` files
        carry the network's flows.

    Returns
    -------
    list of dict
        Per image: format -> file written.
    """
    from cellpose_finetuning.io.annotations import check_formats, write_outputs
    from cellpose_finetuning.io.images import read_image

    formats = check_formats(save)
    paths = [Path(p) for p in paths]
    images = [read_image(p) for p in paths]
    if "seg" in formats:  # the GUI shows the network's flows: ask for them
        kwargs.setdefault("return_flows", True)
    results = await svc.infer(input_arrays=list(images), **kwargs)
    return [
        write_outputs(out, p.name, r["output"], formats, image=img, flows=r.get("flows"))
        for p, img, r in zip(paths, images, results, strict=True)
    ]


async def publish_package(
    server: Any,
    package_dir: str | os.PathLike[str],
    *,
    collection: str,
    alias: str,
    training_dataset_id: str | None = None,
) -> dict[str, Any]:
    """Upload a built BioImage.IO package folder as a model artifact in ``collection``.

    Uses the caller's own connection (and so their permissions). Returns the
    keys ``export_model`` returns.
    """
    am = await server.get_service("public/artifact-manager")
    return await _publish(
        am,
        Path(package_dir),
        collection=dict(await am.read(collection)),
        alias=alias,
        server_url=str(server.config.public_base_url),
        training_dataset_id=training_dataset_id,
    )


async def evaluate(
    svc: Any,
    models: list[str],
    *,
    artifact: str,
    test_images: str,
    test_annotations: str,
    out: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Score models on a labelled dataset artifact (the service's ``evaluate``).

    Parameters
    ----------
    svc : service proxy
        From :func:`connect`.
    models : list of str
        ``cpsam``, checkpoint names offered by the service, your session ids.
    artifact, test_images, test_annotations : str
        The dataset and its image/mask specs (folder or pattern form).
    out : path-like, optional
        Also write ``evaluation.json``, ``evaluation.md``, ``per_image_ap.png``
        and ``overlays.png`` there.
    **kwargs
        ``diameter``, ``flow_threshold``, ``cellprob_threshold``.

    Returns
    -------
    dict
        ``report``, ``markdown`` and the two pictures as PNG bytes.
    """
    import json

    result = await svc.evaluate(
        models=list(models),
        artifact=artifact,
        test_images=test_images,
        test_annotations=test_annotations,
        **kwargs,
    )
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "evaluation.json").write_text(json.dumps(result["report"], indent=1))
        (folder / "evaluation.md").write_text(result["markdown"])
        for key, name in (
            ("per_image_ap_png", "per_image_ap.png"),
            ("overlays_png", "overlays.png"),
        ):
            if key in result:
                (folder / name).write_bytes(bytes(result[key]))
    return result
