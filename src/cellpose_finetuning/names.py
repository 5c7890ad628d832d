"""Every name and fixed default shared across layers, declared once.

Service id, workspace, collection, data folder, ports and token lifetimes are
read from here by the engine's sessions, the service, the deployments, the
CLI and the docs. Settings with bounds and help (training and inference) live
in :mod:`cellpose_finetuning.engine.schemas`; this module holds plain names.

Nothing here imports anything of the package, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "APP_CLASS",
    "APP_ID",
    "DEFAULT_COLLECTION",
    "DEFAULT_COLLECTION_ALIAS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_HOST",
    "DEFAULT_HYPHA_PORT",
    "DEFAULT_S3_PORT",
    "DEFAULT_USER",
    "DEFAULT_WORKSPACE",
    "MIN_TOKEN_LIFETIME_S",
    "SERVICE_ID",
    "SERVICE_TOKEN_LIFETIME_S",
    "SERVICE_USER",
    "USER_TOKEN_LIFETIME_S",
    "WEED_FILER_PORT",
    "WEED_MASTER_PORT",
    "WEED_VOLUME_PORT",
]

#: The Hypha service id, the original's: ``get_service("bioimage-io/cellpose-finetuning")``.
SERVICE_ID = "cellpose-finetuning"
#: The embedded stack registers the service where the original lived.
DEFAULT_WORKSPACE = "bioimage-io"
#: The default export collection's alias, and its full id.
DEFAULT_COLLECTION_ALIAS = "colab-annotations"
DEFAULT_COLLECTION = f"{DEFAULT_WORKSPACE}/{DEFAULT_COLLECTION_ALIAS}"
#: The service's own user id (owner of the workspace on the embedded stack).
SERVICE_USER = "cellpose-service"
#: Whose token ``connection.json`` holds on the embedded stack.
DEFAULT_USER = "local-user"

#: Where sessions, the stack's storage, secrets and caches live.
DEFAULT_DATA_DIR = Path.home() / ".cellpose-finetuning"

#: The embedded stack's addresses.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HYPHA_PORT = 9527
DEFAULT_S3_PORT = 9483
WEED_MASTER_PORT = 9433
WEED_VOLUME_PORT = 9480
WEED_FILER_PORT = 9488

#: Default lifetime of a user's token (``cellpose-finetuning token``).
USER_TOKEN_LIFETIME_S = 30 * 24 * 3600
#: Lifetime of the service's own token; it is minted anew at every start.
SERVICE_TOKEN_LIFETIME_S = 365 * 24 * 3600
#: A token that expires sooner than this is refused for a long-running service
#: (the original's tokens expired inside the deployment).
MIN_TOKEN_LIFETIME_S = 24 * 3600

#: The BioEngine application: its deployment id and its Ray Serve class.
APP_ID = "cellpose-finetuning-app"
APP_CLASS = "CellposeFinetuningApp"

#: The embedded stack's S3 bucket for Hypha's workspaces and artifacts (``--workspace-bucket``),
#: which the service also reads dataset files from directly (data/s3direct.py).
STACK_S3_BUCKET = "hypha-workspaces"
#: The region name the embedded stack gives Hypha and its own S3 clients.
STACK_S3_REGION = "us-east-1"
