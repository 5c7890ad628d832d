"""The service's publishing methods: export a session as a BioImage.IO model, list models."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cellpose_finetuning.data.artifacts import parse_artifact_id
from cellpose_finetuning.data.publishing import list_children, publish_package
from cellpose_finetuning.engine.schemas import INFERENCE_DEFAULTS as INF
from cellpose_finetuning.engine.schemas import (
    InferenceSettings,
)
from cellpose_finetuning.engine.sessions import (
    atomic_write_json,
)
from cellpose_finetuning.errors import (
    InvalidInput,
    NotFound,
)
from cellpose_finetuning.names import DEFAULT_COLLECTION
from cellpose_finetuning.service.auth import (
    Caller,
    caller_from_context,
    can_read,
    readable_artifact,
    writable_collection,
)
from cellpose_finetuning.service.base import ServiceBase
from cellpose_finetuning.service.edge import (
    api_method,
)
from cellpose_finetuning.service.payloads import (
    MODEL_NAME,
    default_model_name,
    normalize_authors,
    normalize_uploader,
)

__all__ = ["PublishingMethods"]


class PublishingMethods(ServiceBase):
    """export_model and list_models_by_dataset."""

    # ------------------------------------------------------------------ export
    @api_method
    async def export_model(
        self,
        session_id: str,
        model_name: str | None = None,
        description: str | None = None,
        authors: list[dict[str, Any]] | None = None,
        uploader: dict[str, Any] | None = None,
        collection: str = DEFAULT_COLLECTION,
        checkpoint: str = "best",
        license: str | None = None,
        flow_threshold: float = INF["flow_threshold"],
        cellprob_threshold: float = INF["cellprob_threshold"],
        context: Any = None,
    ) -> dict[str, Any]:
        """Export one of your sessions as a BioImage.IO model into a collection.

        Returns artifact_id, model_name, status ("exported"), artifact_url, download_url (zip)
        and files. The package is validated with bioimageio.spec before anything is uploaded.
        model_name: default "cellpose-<session id>". description is added to the model's
        description; authors: [{name, affiliation, ...}]; uploader: {name, email}.
        Exporting a session again before it trains further returns the first export.
        flow_threshold/cellprob_threshold are baked into the exported model.
        """
        import json
        import tempfile

        from cellpose_finetuning.errors import Conflict
        from cellpose_finetuning.export.bioimageio import build_package

        caller = caller_from_context(context)
        session = self._session(session_id, caller)
        status = session.read_status()
        if status.status_type not in ("completed", "stopped"):
            raise InvalidInput(
                "session_id",
                f"session {session.id!r} is {status.status_type}; "
                "only completed or stopped sessions can be exported",
            )
        if description is not None and not isinstance(description, str):
            raise InvalidInput("description", "must be a string")
        author_list = normalize_authors(authors)
        uploader_info = normalize_uploader(uploader)
        previous = session.path / "export.json"
        if (
            status.exported_artifact_id
            and status.model_modified is False
            and previous.is_file()
            and model_name in (None, status.exported_artifact_id.split("/")[-1])
        ):
            # The original returns the earlier export of an unchanged model.
            return json.loads(previous.read_text())
        if model_name is None or model_name == "":
            model_name = default_model_name(session.id)
        if not isinstance(model_name, str) or not MODEL_NAME.fullmatch(model_name):
            raise InvalidInput(
                "model_name", f"use 3-63 lowercase letters, digits and hyphens (got {model_name!r})"
            )
        record = await writable_collection(self.artifacts, collection, caller)
        workspace = record["workspace"]
        alias_id = f"{workspace}/{model_name}"
        try:
            await self.artifacts.read(alias_id)  # type: ignore[union-attr]
        except NotFound:
            pass
        else:
            raise Conflict(f"model_name: {alias_id!r} already exists; choose another name")
        inference = InferenceSettings(
            flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold
        )
        with tempfile.TemporaryDirectory(prefix="cpft-export-") as tmp:
            result = await asyncio.to_thread(
                build_package,
                session,
                Path(tmp) / "pkg",
                checkpoint=checkpoint,
                model_name=model_name,
                license=license,
                inference=inference,
                authors=author_list or [caller.id],
                description=description,
                uploader=uploader_info,
            )
            answer = await publish_package(
                self.artifacts.am,  # type: ignore[union-attr]
                result.path,
                collection=record,
                alias=model_name,
                server_url=self.server_url,
                training_dataset_id=status.dataset_artifact_id,
                manifest_extra={"exported_by": caller.id, "session_id": session.id},
            )
        atomic_write_json(previous, answer)
        session.update_status(exported_artifact_id=answer["artifact_id"], model_modified=False)
        return answer

    @api_method
    async def list_models_by_dataset(
        self, dataset_id: str, collection: str = DEFAULT_COLLECTION, context: Any = None
    ) -> list[dict[str, Any]]:
        """Models in a collection trained on a dataset: id, name, created_at, url; newest first.

        Only models this service exported and the caller may read are listed.
        """
        caller = caller_from_context(context)
        dataset_id = parse_artifact_id(dataset_id, "dataset_id")
        record = await readable_artifact(
            self.artifacts, collection, caller, arg="collection", kind="collection"
        )
        if record.get("type") != "collection":
            raise InvalidInput("collection", f"{record['id']!r} is not a collection")
        out = []
        items = await list_children(
            self.artifacts.am,  # type: ignore[union-attr]
            record["id"],
            filters={"manifest": {"training_dataset_id": dataset_id}},
            order_by="created_at>",
        )
        for item in items:
            if not self._listable_model(item, record, caller):
                continue
            alias = item.get("alias") or item["id"].split("/")[-1]
            out.append(
                {
                    "id": item["id"],
                    "name": (item.get("manifest") or {}).get("name", alias),
                    "created_at": item.get("created_at"),
                    "url": f"{self.server_url}/{item['workspace']}/artifacts/{alias}",
                }
            )
        out.sort(key=lambda m: m["created_at"] or 0, reverse=True)
        return out

    def _listable_model(
        self, item: dict[str, Any], collection: dict[str, Any], caller: Caller
    ) -> bool:
        """A model this service exported (``created_by``) that the caller may read."""
        service_user = self.owners.service_user
        if service_user is not None and item.get("created_by") != service_user:
            return False  # anyone with "@": "r+" could have added it
        return can_read(caller, item, collection)
