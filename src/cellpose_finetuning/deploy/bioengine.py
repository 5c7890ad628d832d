"""Ship the service as a BioEngine app: manifest checks, upload, deploy, the app's core.

The app folder (``bioengine-app/`` in the repository; not ``bioengine/``, which
would shadow the ``bioengine`` package when run from the checkout) follows BioEngine's
current app format (manifest ``format_version: 0.6.0``, ``entry:
module:Class``, a ``@bioengine.app`` class whose ``@bioengine.method``
methods become the app's API; read from aicell-lab/bioengine 0.16.1,
``bioengine/utils/artifact_utils.py::validate_manifest`` and
``docs/migration/v0.11.md``). The entry class is thin: everything it does
is :class:`AppCore`, from this package.

Per-user access control: BioEngine's proxy checks who may call which
method, but (in worker releases before ``@bioengine.method(context=True)``)
does not pass the caller's identity on to the app. So the app does not rely
on it: at start it registers *its own* Hypha service, ``cellpose-finetuning``,
with ``require_context`` — the same :class:`CellposeService` object as the
embedded service — and every per-user method (training, sessions, export,
inference with a session) is called there, where Hypha itself tells the
service who is calling. The app's BioEngine methods are only the ones that
need no identity (``list_pretrained_models``, ``get_training_capabilities``,
``get_service_info``).

Tokens: the deploy token is checked by the one lifetime rule
(:func:`~cellpose_finetuning.deploy.stack.tokens.check_token_lifetime`):
expired or expiring within a day, it is refused, with how to get a longer
one (BioEngine hands it to every replica it starts, so it must outlast more
than the first start). Inside the app it is exchanged at start for a service
token valid for a year, so a running deployment does not break when the
deploy token expires (the original service's failure).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cellpose_finetuning.deploy.stack.tokens import check_token_lifetime
from cellpose_finetuning.errors import CellposeFinetuningError, InvalidInput
from cellpose_finetuning.names import APP_CLASS, SERVICE_ID, SERVICE_TOKEN_LIFETIME_S

__all__ = [
    "AppCore",
    "TokenWarning",
    "check_token",
    "deploy_app",
    "load_token",
    "read_manifest",
    "upload_app",
    "validate_manifest",
]

log = logging.getLogger(__name__)

#: The manifest format BioEngine workers accept (bioengine >= 0.11).
FORMAT_VERSION = "0.6.0"
_REQUIRED = ("name", "id", "id_emoji", "description", "type", "entry")
_ENTRY_RE = re.compile(r"^[a-z_][\w]*(\.[a-z_][\w]*)*:[A-Z]\w*$")
_ALIAS_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
#: Files of the app folder that are never uploaded.
_SKIP = ("__pycache__", ".pyc", ".DS_Store")
#: Requirements file the entry module reads for its ``pip=`` list.
REQUIREMENTS_FILE = "requirements-app.txt"
#: The app's data folder, under the ``HOME`` BioEngine gives it (documented in
#: bioengine-app/README.md; not :data:`~cellpose_finetuning.names.DEFAULT_DATA_DIR`,
#: which is resolved when this package is imported, and hidden).
APP_DATA_DIR_NAME = "cellpose-finetuning"


class TokenWarning(UserWarning):
    """The token expires soon.

    No longer emitted: a token expiring within a day is refused
    (:func:`check_token`). Kept so that code filtering it still imports.
    """


# --------------------------------------------------------------------------- manifest
def validate_manifest(manifest: dict[str, Any], app_dir: Path | None = None) -> None:
    """Check a BioEngine app manifest (format 0.6.0) and, with ``app_dir``, its entry file.

    Raises
    ------
    InvalidInput
        Naming the first bad field.
    """
    if not isinstance(manifest, dict):
        raise InvalidInput("manifest.yaml", "must be a mapping")
    if "deployments" in manifest:
        raise InvalidInput(
            "manifest.yaml: deployments", "the v0.5 layout; use 'entry: module:Class'"
        )
    if str(manifest.get("format_version")) != FORMAT_VERSION:
        raise InvalidInput(
            "manifest.yaml: format_version",
            f"{manifest.get('format_version')!r}, expected {FORMAT_VERSION!r}",
        )
    for key in _REQUIRED:
        if key not in manifest:
            raise InvalidInput(f"manifest.yaml: {key}", "missing")
    if manifest["type"] != "ray-serve":
        raise InvalidInput("manifest.yaml: type", f"{manifest['type']!r}, expected 'ray-serve'")
    if not isinstance(manifest["id"], str) or not _ALIAS_RE.match(manifest["id"]):
        raise InvalidInput("manifest.yaml: id", "lowercase letters, digits and hyphens only")
    entry = manifest["entry"]
    if not isinstance(entry, str) or not _ENTRY_RE.match(entry):
        raise InvalidInput("manifest.yaml: entry", f"{entry!r} is not 'module:ClassName'")
    if not manifest.get("version"):
        raise InvalidInput("manifest.yaml: version", "missing (BioEngine needs it to upload)")
    if app_dir is not None:
        module, cls = entry.split(":")
        path = Path(app_dir, *module.split(".")).with_suffix(".py")
        if not path.is_file():
            raise InvalidInput("manifest.yaml: entry", f"{path.name} is not in {app_dir}")
        if not re.search(rf"^class {cls}\b", path.read_text(), re.MULTILINE):
            raise InvalidInput("manifest.yaml: entry", f"no class {cls} in {path.name}")
        frontend = manifest.get("frontend_entry")
        if frontend and not (Path(app_dir) / frontend).is_file():
            raise InvalidInput("manifest.yaml: frontend_entry", f"{frontend} is missing")


def read_manifest(app_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``app_dir/manifest.yaml``."""
    path = Path(app_dir) / "manifest.yaml"
    if not path.is_file():
        raise InvalidInput(str(app_dir), "no manifest.yaml in this folder")
    try:
        manifest = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidInput(str(path), f"not valid YAML: {exc}") from None
    validate_manifest(manifest, Path(app_dir))
    return manifest


# --------------------------------------------------------------------------- tokens
def _dotenv_token(path: Path) -> str | None:
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip().removeprefix("export ").strip() == "HYPHA_TOKEN":
            return value.strip().strip("'\"") or None
    return None


def load_token(explicit: str | None = None, env_file: str | os.PathLike[str] = ".env") -> str:
    """The token: ``explicit``, else ``$HYPHA_TOKEN``, else ``HYPHA_TOKEN=`` in ``env_file``."""
    token = explicit or os.environ.get("HYPHA_TOKEN") or _dotenv_token(Path(env_file))
    if not token:
        raise InvalidInput(
            "--token", f"no token: pass --token, set HYPHA_TOKEN or put it in {env_file}"
        )
    return check_token(token)


def check_token(token: str, now: float | None = None) -> str:
    """Refuse a deploy token that has expired or expires within a day.

    The project's one lifetime rule,
    :func:`~cellpose_finetuning.deploy.stack.tokens.check_token_lifetime`; the
    error says how to get a longer token.
    """
    return check_token_lifetime(token, now=now)


# --------------------------------------------------------------------------- upload
def build_wheel(project_dir: Path, out_dir: Path) -> Path:
    """Build this package's wheel from its source tree (``pip wheel --no-deps``)."""
    if not (project_dir / "pyproject.toml").is_file():
        raise InvalidInput(str(project_dir), "not a source checkout of cellpose-finetuning")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out_dir), "."],
        cwd=project_dir,
        check=True,
    )
    wheels = sorted(out_dir.glob("cellpose_finetuning-*.whl"))
    if not wheels:
        raise CellposeFinetuningError("pip wheel produced no cellpose_finetuning wheel")
    return wheels[-1]


def app_files(app_dir: Path) -> dict[str, Path]:
    """Files of the app folder to upload (relative path -> file)."""
    files = {}
    for path in sorted(app_dir.rglob("*")):
        if path.is_file() and not any(s in str(path) for s in _SKIP):
            files[path.relative_to(app_dir).as_posix()] = path
    return files


def _requirements(wheel_url: str, base: str) -> str:
    lines = [
        line
        for line in base.splitlines()
        if line.strip() and not line.startswith("#") and "cellpose-finetuning" not in line
    ]
    return "\n".join([f"cellpose-finetuning[client,export] @ {wheel_url}", *lines]) + "\n"


async def upload_app(
    server: Any,
    app_dir: str | os.PathLike[str],
    *,
    project_dir: str | os.PathLike[str] | None = None,
    wheel: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Upload the app folder (and this package's wheel) as a BioEngine application artifact.

    The artifact goes to ``<workspace>/applications`` (created if missing,
    publicly readable, as BioEngine expects) under the manifest's ``id``.
    Its ``requirements-app.txt`` points at the wheel inside the artifact, so
    the replicas install exactly this build.

    Parameters
    ----------
    server : Any
        A hypha-rpc connection (the uploader's workspace).
    app_dir : path
        The app folder (``bioengine-app/``).
    project_dir : path, optional
        Source checkout to build the wheel from (default: the app folder's parent).
    wheel : path, optional
        A prebuilt wheel instead.

    Returns
    -------
    dict
        ``artifact_id``, ``version``, ``files`` and ``wheel_url``.
    """
    from cellpose_finetuning.data.artifacts import upload_files

    app_dir = Path(app_dir).resolve()
    manifest = read_manifest(app_dir)
    workspace = server.config.workspace
    am = await server.get_service("public/artifact-manager")
    collection = f"{workspace}/applications"
    try:
        await am.read(collection)
    except Exception:
        await am.create(
            type="collection",
            alias="applications",
            manifest={"name": "Applications", "description": f"BioEngine apps of {workspace}"},
            config={"permissions": {"*": "r"}},
        )
    artifact_id = f"{workspace}/{manifest['id']}"
    manifest = {**manifest, "created_by": server.config.user["id"]}
    try:
        await am.read(artifact_id)
        exists = True
    except Exception:
        exists = False
    if exists:
        await am.edit(artifact_id=artifact_id, manifest=manifest, type="application", stage=True)
    else:
        await am.create(
            type="application",
            alias=manifest["id"],
            parent_id=collection,
            manifest=manifest,
            config={"permissions": {"*": "r"}},
            stage=True,
        )
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = (
            Path(wheel)
            if wheel
            else build_wheel(Path(project_dir or app_dir.parent).resolve(), Path(tmp))
        )
        files = app_files(app_dir)
        files.pop(REQUIREMENTS_FILE, None)
        files[wheel_path.name] = wheel_path
        base = server.config.public_base_url.rstrip("/")
        ws, alias = artifact_id.split("/")
        wheel_url = f"{base}/{ws}/artifacts/{alias}/files/{wheel_path.name}"
        base_reqs = (
            (app_dir / REQUIREMENTS_FILE).read_text()
            if (app_dir / REQUIREMENTS_FILE).is_file()
            else ""
        )
        reqs = Path(tmp) / REQUIREMENTS_FILE
        reqs.write_text(_requirements(wheel_url, base_reqs))
        files[REQUIREMENTS_FILE] = reqs
        await upload_files(am, artifact_id, files, commit=False)
    await am.commit(artifact_id, version=str(manifest["version"]) if not exists else None)
    return {
        "artifact_id": artifact_id,
        "version": manifest["version"],
        "files": sorted(files),
        "wheel_url": wheel_url,
    }


async def deploy_app(
    server: Any,
    worker_service_id: str,
    artifact_id: str,
    *,
    token: str,
    application_id: str | None = None,
    disable_gpu: bool | None = None,
    application_kwargs: dict[str, Any] | None = None,
    redeploy: bool = False,
) -> str:
    """Ask a BioEngine worker to deploy (or, with ``redeploy``, update) the app.

    ``redeploy`` needs the ``application_id`` of a running deployment and
    fails clearly when the worker does not know it.
    """
    worker = await server.get_service(worker_service_id)
    if redeploy:
        if not application_id:
            raise InvalidInput("--application-id", "needed to redeploy")
        status = await worker.get_app_status(application_ids=[application_id])
        if not status or application_id not in status:
            raise InvalidInput(
                "--application-id", f"{application_id!r} is not deployed on {worker_service_id}"
            )
    kwargs: dict[str, Any] = {
        "artifact_id": artifact_id,
        "application_id": application_id,
        "hypha_token": token,
    }
    if disable_gpu is not None:
        kwargs["disable_gpu"] = disable_gpu
    if application_kwargs:
        kwargs["application_kwargs"] = {APP_CLASS: application_kwargs}
    return await worker.deploy_app(**kwargs)


# --------------------------------------------------------------------------- app core
class AppCore:
    """What the BioEngine entry class does, testable without BioEngine or Ray Serve.

    Parameters
    ----------
    data_dir : path, optional
        Sessions, models and dataset cache (default ``$HOME/cellpose-finetuning``,
        :data:`APP_DATA_DIR_NAME`;
        BioEngine sets ``HOME`` to the app's work directory).
    service_id : str
        Id of the service the app registers with ``require_context``.
    service_config : dict, optional
        :class:`~cellpose_finetuning.service.api.ServiceConfig` limits.
    training_on_ray : bool
        Run training sessions as Ray tasks (inside a BioEngine replica Ray is
        there); else in worker processes next to the replica.
    training_gpus : float
        GPUs each Ray training task asks for.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        service_id: str = SERVICE_ID,
        service_config: dict[str, Any] | None = None,
        training_on_ray: bool = False,
        training_gpus: float = 0.0,
    ) -> None:
        self.data_dir = Path(data_dir or Path.home() / APP_DATA_DIR_NAME).expanduser()
        self.service_id = service_id
        self.service_config = dict(service_config or {})
        self.training_on_ray = training_on_ray
        self.training_gpus = training_gpus
        self.service: Any = None
        self.info: dict[str, Any] = {}
        self._connections: list[Any] = []

    def _local_service(self) -> Any:
        from cellpose_finetuning.service.api import CellposeService, ServiceConfig

        if self.service is None:
            self.service = CellposeService(
                ServiceConfig(data_dir=self.data_dir, **self.service_config)
            )
        return self.service

    async def start(self, server_url: str | None = None, token: str | None = None) -> dict:
        """Connect with the deploy token, take a year-long token, register the service.

        ``server_url`` and ``token`` default to BioEngine's ``HYPHA_SERVER_URL``
        and ``HYPHA_TOKEN``.
        """
        from hypha_rpc import connect_to_server

        from cellpose_finetuning.deploy.serve import start_service

        server_url = server_url or os.environ.get("HYPHA_SERVER_URL")
        token = token or os.environ.get("HYPHA_TOKEN")
        if not server_url or not token:
            raise CellposeFinetuningError(
                "HYPHA_SERVER_URL and HYPHA_TOKEN must be set (deploy with hypha_token)"
            )
        # exchanged at once for a year-long token: it only has to be valid now
        check_token_lifetime(token, min_lifetime_s=0)
        first = await connect_to_server({"server_url": server_url, "token": token})
        try:
            long_token = await first.generate_token(
                {"workspace": first.config.workspace, "expires_in": SERVICE_TOKEN_LIFETIME_S}
            )
        finally:
            await first.disconnect()
        executors: dict[str, Any] = {}
        if self.training_on_ray:
            from cellpose_finetuning.deploy.ray_backend import RayTrainingQueue

            executors["training"] = RayTrainingQueue(
                self.service_config.get("max_concurrent_trainings", 1),
                num_gpus=self.training_gpus,
            )
        admin, server, service, info = await start_service(
            server_url, long_token, self.data_dir, self.service_config, None, executors
        )
        self._connections = [admin, server]
        self.service = service
        self.info = {
            "service_id": f"{server.config.workspace}/{self.service_id}",
            "full_service_id": info["id"],
            "server_url": server_url,
        }
        return self.info

    async def stop(self) -> None:
        """Unregister and release everything."""
        if self.service is not None:
            await self.service.close()
        for conn in {id(c): c for c in self._connections}.values():
            try:
                await conn.disconnect()
            except Exception:  # already gone
                log.debug("disconnect failed", exc_info=True)
        self._connections = []

    async def list_pretrained_models(self) -> list[str]:
        """The models ``infer`` and ``start_training`` accept by name."""
        return self._local_service().resolver.pretrained_names()

    async def get_training_capabilities(self) -> dict[str, Any]:
        """Trainable models and every training parameter with its default and bounds."""
        return await self._local_service().get_training_capabilities()

    def service_info(self) -> dict[str, Any]:
        """Where the per-user API lives, and why."""
        return {
            **self.info,
            "note": "Training, sessions, export and inference with your sessions are methods "
            f"of the service {self.info.get('service_id', self.service_id)!r}, which knows "
            "who calls; call them there.",
        }
