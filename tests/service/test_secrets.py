"""No secret leaks into logs, status files or error messages.

The module makes what it scans itself (a dataset upload, a training session
with test data, an export, failing downloads), so it holds in any order; run
after other service tests on the same stack, it scans their sessions too.
"""

from __future__ import annotations

import json
import re

import pytest

from cellpose_finetuning.client import follow, upload_folder

pytestmark = pytest.mark.stack

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.")
PRESIGNED = re.compile(r"X-Amz-(Signature|Credential)=", re.IGNORECASE)


# The tiny network trained for an epoch finds objects only at permissive thresholds.
LOOSE = {"flow_threshold": 0.0, "cellprob_threshold": -3.0}


@pytest.fixture(scope="module")
async def activity(running_stack, dev_data):
    """A trained and exported session of olga's, and the errors of downloads that fail."""
    server = await running_stack.connect("olga")
    try:
        svc = await server.get_service(running_stack.service_id)
        dataset = await upload_folder(server, dev_data, alias="secrets-set")
        started = await svc.start_training(
            artifact=dataset,
            train_images="images/train/",
            train_annotations="annotations/train/",
            test_images="images/test/",
            test_annotations="annotations/test/",
            model="tiny",
            n_epochs=1,
        )
        status = await follow(svc, started["session_id"], interval=0.3, show_progress=False)
        assert status["status_type"] == "completed", status["message"]
        await svc.export_model(
            session_id=started["session_id"],
            model_name="olga-secrets-model",
            collection="bioimage-io/colab-annotations",
            **LOOSE,
        )
        errors = []
        for paths in (["missing/file.tif"], ["files/x.tif"]):
            with pytest.raises(Exception) as err:
                await svc.infer(model="tiny", artifact="ws-user-olga/nothing", image_paths=paths)
            errors.append(str(err.value))
        return errors
    finally:
        await server.disconnect()


def _texts(data_dir):
    for path in sorted((data_dir / "sessions").glob("*/log.txt")):
        yield path, path.read_text(errors="replace")
    for path in sorted((data_dir / "sessions").glob("*/status.json")):
        yield path, path.read_text(errors="replace")
    for path in sorted((data_dir / "logs").glob("*.log")):
        yield path, path.read_text(errors="replace")


async def test_no_tokens_keys_or_presigned_urls_in_logs_and_status(running_stack, activity):
    secrets = json.loads((running_stack.data_dir / "secret.json").read_text())
    scanned = 0
    for path, text in _texts(running_stack.data_dir):
        scanned += 1
        for name, value in secrets.items():
            assert value not in text, f"{name} found in {path}"
        assert not PRESIGNED.search(text), f"presigned URL in {path}"
        if "sessions" in path.parts:
            assert not JWT.search(text), f"token in {path}"
    assert scanned >= 3  # the stack logs plus at least one session


async def test_errors_returned_to_callers_carry_no_presigned_url(activity):
    assert len(activity) == 2
    for error in activity:
        assert not PRESIGNED.search(error)
        assert not JWT.search(error)


async def test_every_completed_session_and_export_is_still_loadable(running_stack, activity):
    """After whatever else ran on this stack (fault and load tests): nothing finished was lost."""
    from cellpose_finetuning.engine.models import load_network
    from cellpose_finetuning.engine.sessions import SessionStore

    completed = 0
    for session in SessionStore(running_stack.data_dir / "sessions"):
        status = session.read_status()
        if status.status_type == "completed":
            net, _ = load_network(session.weights("best"))
            assert net is not None, session.id
            completed += 1
    assert completed >= 1
    server = await running_stack.connect("olga")
    try:
        am = await server.get_service("public/artifact-manager")
        models = await am.list("bioimage-io/colab-annotations", limit=1000)
        # the service's exports; test_security plants fakes in this collection too
        models = [m for m in models if "exported_by" in (m.get("manifest") or {})]
        assert len(models) >= 1
        for model in models:
            url = await am.get_file(model["id"], file_path="rdf.yaml")
            import httpx

            async with httpx.AsyncClient(timeout=60) as client:
                assert (await client.get(url)).status_code == 200, model["id"]
    finally:
        await server.disconnect()
