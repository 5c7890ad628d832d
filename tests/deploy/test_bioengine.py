"""The BioEngine app: manifest rules, the entry class, isolation in app mode, upload, deploy."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cellpose_finetuning.cli import main
from cellpose_finetuning.deploy.bioengine import (
    AppCore,
    check_token,
    load_token,
    read_manifest,
    upload_app,
    validate_manifest,
)
from cellpose_finetuning.deploy.stack import mint_token
from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.engine.sessions import DataSpec, SessionStore
from cellpose_finetuning.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "bioengine-app"


def _load_entry_module():
    manifest = read_manifest(APP_DIR)
    module, cls = manifest["entry"].split(":")
    spec = importlib.util.spec_from_file_location(module, APP_DIR / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return getattr(mod, cls)


# --------------------------------------------------------------------------- manifest
def test_the_app_folder_follows_bioengines_manifest_conventions():
    manifest = read_manifest(APP_DIR)
    assert manifest["format_version"] == "0.6.0"
    assert manifest["type"] == "ray-serve"
    assert manifest["entry"] == "cellpose_finetuning_app:CellposeFinetuningApp"
    assert "deployments" not in manifest


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"format_version": "0.5.0"}, "format_version"),
        ({"deployments": ["main:App"]}, "deployments"),
        ({"entry": "main.App"}, "entry"),
        ({"entry": "nope:CellposeFinetuningApp"}, "entry"),
        ({"entry": "cellpose_finetuning_app:Missing"}, "no class Missing"),
        ({"type": "python"}, "type"),
        ({"id": "Cellpose_FT"}, "id"),
        ({"id_emoji": None}, "id_emoji"),
    ],
)
def test_a_bad_manifest_names_the_field(change, needle):
    manifest = yaml.safe_load((APP_DIR / "manifest.yaml").read_text())
    for key, value in change.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    with pytest.raises(InvalidInput, match=needle):
        validate_manifest(manifest, APP_DIR)


# --------------------------------------------------------------------------- entry class
def test_the_entry_class_imports_and_lists_pretrained_models(tmp_path, tiny_model, monkeypatch):
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_model, tmp_path / "models" / "tiny.pth")
    monkeypatch.setenv("CELLPOSE_FINETUNING_DATA", str(tmp_path))
    app_class = _load_entry_module()
    app = app_class(max_concurrent_trainings=1)
    assert asyncio.run(app.list_pretrained_models()) == ["cpsam", "tiny"]
    caps = asyncio.run(app.get_training_capabilities())
    assert caps["parameters"]["n_epochs"]["default"] == 10


# --------------------------------------------------------------------------- tokens
def _expired_token() -> str:
    from jose import jwt

    return jwt.encode({"sub": "dave", "exp": int(time.time()) - 60}, "s" * 32, algorithm="HS256")


def test_tokens_expired_or_expiring_within_a_day_are_refused(tmp_path, monkeypatch):
    secret = "s" * 32
    expired = _expired_token()
    with pytest.raises(InvalidInput, match="expired"):
        check_token(expired)
    one_hour = mint_token("dave", secret=secret, expires_in=3600)
    with pytest.raises(InvalidInput, match="expired"):
        check_token(one_hour, now=time.time() + 7200)
    # BioEngine hands the deploy token to every replica it starts: one the
    # deployment outlives is refused, saying how to get a longer one.
    soon = mint_token("dave", secret=secret, expires_in=3600)
    with pytest.raises(InvalidInput, match=r"expires in 1\.0 h.*generate_token"):
        check_token(soon)
    fine = mint_token("dave", secret=secret, expires_in=7 * 24 * 3600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_token(fine) == fine
    monkeypatch.delenv("HYPHA_TOKEN", raising=False)
    env = tmp_path / ".env"
    env.write_text(f"OTHER=1\nexport HYPHA_TOKEN='{fine}'\n")
    assert load_token(None, env) == fine
    with pytest.raises(InvalidInput, match="no token"):
        load_token(None, tmp_path / "missing.env")


def test_the_cli_refuses_an_expired_token_with_one_line(tmp_path):
    expired = _expired_token()
    result = CliRunner().invoke(
        main,
        ["bioengine", "--server-url", "http://127.0.0.1:9", "--token", expired, "upload"],
    )
    assert result.exit_code != 0
    assert "expired" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- on the stack


async def _connect(stack, user):
    from hypha_rpc import connect_to_server

    config = {"server_url": stack.server_url}
    if user:
        config["token"] = stack.token(user)
    return await connect_to_server(config)


@pytest.mark.stack
async def test_in_app_mode_the_registered_service_keeps_users_apart(
    hypha_stack, tmp_path, tiny_model
):
    """The app registers its own require_context service: Hypha tells it who calls."""
    core = AppCore(tmp_path / "app-data")
    info = await core.start(hypha_stack.server_url, hypha_stack.token("dave"))
    alice = await _connect(hypha_stack, "alice")
    bob = await _connect(hypha_stack, "bob")
    anonymous = await _connect(hypha_stack, None)
    try:
        assert info["service_id"] == "ws-user-dave/cellpose-finetuning"
        store = SessionStore(tmp_path / "app-data" / "sessions")
        session = store.create(TrainingSettings(model="cpsam"), DataSpec(train=[]), owner="alice")
        as_alice = await alice.get_service(info["service_id"])
        as_bob = await bob.get_service(info["service_id"])
        as_anonymous = await anonymous.get_service(info["service_id"])
        assert list(await as_alice.list_training_sessions()) == [session.id]
        assert await as_bob.list_training_sessions() == {}
        with pytest.raises(Exception, match="not found"):
            await as_bob.get_training_status(session.id)
        with pytest.raises(Exception, match="not found"):
            await as_bob.stop_training(session.id)
        with pytest.raises(Exception, match="needs a logged-in user"):
            await as_anonymous.list_training_sessions()
        status = await as_alice.get_training_status(session.id)
        assert status["session_id"] == session.id
    finally:
        for conn in (alice, bob, anonymous):
            await conn.disconnect()
        await core.stop()


@pytest.mark.stack
async def test_upload_puts_the_app_and_this_packages_wheel_in_the_applications_collection(
    hypha_stack,
):
    import httpx

    server = await _connect(hypha_stack, "dave")
    try:
        result = await upload_app(server, APP_DIR, project_dir=ROOT)
        assert result["artifact_id"] == "ws-user-dave/cellpose-finetuning"
        am = await server.get_service("public/artifact-manager")
        artifact = await am.read(result["artifact_id"])
        assert artifact["type"] == "application"
        assert artifact["parent_id"] == "ws-user-dave/applications"
        assert artifact["manifest"]["entry"] == "cellpose_finetuning_app:CellposeFinetuningApp"
        names = {f["name"] for f in await am.list_files(result["artifact_id"])}
        wheel = next(n for n in names if n.endswith(".whl"))
        assert {"manifest.yaml", "cellpose_finetuning_app.py", "requirements-app.txt"} <= names
        # The requirements point at the uploaded wheel, which anyone can download.
        async with httpx.AsyncClient(timeout=30) as http:
            reqs = (
                await http.get(
                    f"{hypha_stack.server_url}/ws-user-dave/artifacts/cellpose-finetuning"
                    "/files/requirements-app.txt",
                    follow_redirects=True,
                )
            ).text
            assert reqs.startswith(f"cellpose-finetuning[client,export] @ {result['wheel_url']}")
            got = await http.get(result["wheel_url"], follow_redirects=True)
            assert got.status_code == 200 and got.content[:2] == b"PK", wheel
    finally:
        await server.disconnect()


@pytest.mark.stack
async def test_deploy_and_redeploy_call_the_bioengine_worker(hypha_stack, monkeypatch):
    """A stand-in for BioEngine's worker service (BioEngine itself is not installable here)."""
    calls: list[dict] = []
    deployed: set[str] = set()

    async def deploy_app(context=None, **kwargs):
        calls.append(kwargs)
        deployed.add(kwargs["application_id"])
        return kwargs["application_id"]

    async def get_app_status(application_ids=None, context=None):
        return {a: {"status": "RUNNING"} for a in application_ids or [] if a in deployed}

    worker_conn = await _connect(hypha_stack, "erin")
    await worker_conn.register_service(
        {
            "id": "bioengine-worker",
            "config": {"visibility": "public", "require_context": True},
            "deploy_app": deploy_app,
            "get_app_status": get_app_status,
        }
    )
    token = hypha_stack.token("dave", expires_in=7 * 24 * 3600)
    base = ["bioengine", "--server-url", hypha_stack.server_url, "--token", token]
    worker = ["--worker-service-id", "ws-user-erin/bioengine-worker", "--app-dir", str(APP_DIR)]
    runner = CliRunner()
    try:
        redeploy_unknown = await asyncio.to_thread(
            runner.invoke,
            main,
            [*base, "redeploy", *worker, "--application-id", "cellpose-finetuning-app"],
        )
        assert redeploy_unknown.exit_code != 0
        assert "is not deployed" in redeploy_unknown.output
        result = await asyncio.to_thread(
            runner.invoke, main, [*base, "deploy", *worker, "--max-concurrent-trainings", "2"]
        )
        assert result.exit_code == 0, result.output
        assert "deployed application cellpose-finetuning-app" in result.output
        assert calls[-1]["artifact_id"] == "ws-user-dave/cellpose-finetuning"
        assert calls[-1]["hypha_token"] == token
        assert calls[-1]["application_kwargs"] == {
            "CellposeFinetuningApp": {"max_concurrent_trainings": 2}
        }
        result = await asyncio.to_thread(
            runner.invoke,
            main,
            [*base, "redeploy", *worker, "--application-id", "cellpose-finetuning-app"],
        )
        assert result.exit_code == 0, result.output
        assert len(calls) == 2 and calls[-1]["application_id"] == "cellpose-finetuning-app"
    finally:
        await worker_conn.disconnect()
