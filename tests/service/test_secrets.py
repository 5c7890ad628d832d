"""No secret leaks into logs, status files or error messages.

Runs after the other service tests (file order) so there is plenty to scan:
every session's log and status, the stack's logs, and the errors the
service returns for failing downloads.
"""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.stack

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.")
PRESIGNED = re.compile(r"X-Amz-(Signature|Credential)=", re.IGNORECASE)


def _texts(data_dir):
    for path in sorted((data_dir / "sessions").glob("*/log.txt")):
        yield path, path.read_text(errors="replace")
    for path in sorted((data_dir / "sessions").glob("*/status.json")):
        yield path, path.read_text(errors="replace")
    for path in sorted((data_dir / "logs").glob("*.log")):
        yield path, path.read_text(errors="replace")


async def test_no_tokens_keys_or_presigned_urls_in_logs_and_status(running_stack):
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


async def test_errors_returned_to_callers_carry_no_presigned_url(running_stack):
    server = await running_stack.connect("olga")
    try:
        svc = await server.get_service(running_stack.service_id)
        for paths in (["missing/file.tif"], ["files/x.tif"]):
            with pytest.raises(Exception) as err:
                await svc.infer(model="tiny", artifact="ws-user-olga/nothing", image_paths=paths)
            assert not PRESIGNED.search(str(err.value))
            assert not JWT.search(str(err.value))
    finally:
        await server.disconnect()


async def test_every_completed_session_and_export_is_still_loadable(running_stack):
    """Runs after the fault and load tests on this stack: nothing finished was lost."""
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
