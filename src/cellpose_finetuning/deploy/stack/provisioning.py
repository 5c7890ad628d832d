"""The service's workspace and its default model collection, created if missing.

Used by the embedded stack at every start (Hypha forgets workspaces it has
not loaded after a restart, so creating it before anyone else can connect
keeps it the service's) and by ``serve --server-url URL --workspace WS``.
The checks are strict: only Hypha's "already exists" is taken as "there",
and only if the workspace is owned by the service's user; only "does not
exist" / "not found" makes the collection be created; any other error
(permission, network) is raised, never papered over by creating anew.
"""

from __future__ import annotations

import logging
from typing import Any

from cellpose_finetuning.deploy.stack.config import StackError
from cellpose_finetuning.names import SERVICE_TOKEN_LIFETIME_S

__all__ = ["connection_user", "ensure_collection", "ensure_workspace", "provision"]

log = logging.getLogger(__name__)

WORKSPACE_DESCRIPTION = "cellpose-finetuning service and its models"
COLLECTION_MANIFEST = {
    "name": "Cellpose fine-tuned models",
    "description": "BioImage.IO models exported by cellpose-finetuning",
}
#: Anyone reads; logged-in users add models (the service checks again for each export).
COLLECTION_PERMISSIONS = {"*": "r", "@": "r+"}


def connection_user(server: Any) -> str | None:
    """The user id that artifacts created through a connection carry as ``created_by``.

    Hypha records the *effective* user: the parent of a child token
    (``generate_token``, as BioEngine deployments use), else the user itself.
    """
    user = (getattr(server, "config", None) or {}).get("user") or {}
    if not isinstance(user, dict):
        return None
    uid = user.get("parent") or user.get("id")
    return str(uid) if uid else None


async def ensure_workspace(admin: Any, workspace: str, owner: str) -> None:
    """Create ``workspace`` owned by ``owner``; if it exists, check that ``owner`` owns it.

    Parameters
    ----------
    admin : hypha-rpc connection
        Connected as ``owner`` (or with admin rights).
    workspace : str
        The workspace id.
    owner : str
        The service's user id.

    Raises
    ------
    StackError
        The workspace exists and ``owner`` is not among its owners.
    Exception
        Any other error of Hypha's (not "already exists").
    """
    try:
        await admin.create_workspace(
            {
                "id": workspace,
                "name": workspace,
                "description": WORKSPACE_DESCRIPTION,
                "owners": [owner],
                "persistent": True,
            }
        )
        log.info("created workspace %s", workspace)
    except Exception as exc:
        if "already exists" not in str(exc):
            raise
        try:
            info = await admin.get_workspace_info(workspace)
        except Exception as denied:
            raise StackError(
                f"workspace {workspace!r} exists and {owner!r} may not read it ({denied}): "
                f"choose a workspace {owner!r} owns"
            ) from None
        owners = list(info.get("owners") or [])
        log.info("workspace %s exists, owned by %s", workspace, owners)
        if owner not in owners:
            raise StackError(
                f"workspace {workspace!r} belongs to {owners}, not to {owner!r} "
                f"(taken before the service could create it?): restart the stack, or "
                f"choose a workspace {owner!r} owns"
            ) from None


async def ensure_collection(ws: Any, alias: str) -> str:
    """Create collection ``alias`` in the workspace ``ws`` is connected to, if missing.

    Returns
    -------
    str
        The collection's id, ``<workspace>/<alias>``.

    Raises
    ------
    Exception
        Hypha's error when reading it fails for another reason than its absence.
    """
    collection_id = f"{ws.config.workspace}/{alias}"
    am = await ws.get_service("public/artifact-manager")
    try:
        await am.read(collection_id)
    except Exception as exc:
        if "does not exist" not in str(exc) and "not found" not in str(exc).lower():
            raise
        log.info("creating collection %s", collection_id)
        await am.create(
            type="collection",
            alias=alias,
            manifest=dict(COLLECTION_MANIFEST),
            config={"permissions": dict(COLLECTION_PERMISSIONS)},
        )
    return collection_id


async def provision(
    admin: Any,
    server_url: str,
    workspace: str,
    collection_alias: str,
    *,
    owner: str | None = None,
    workspace_token: str | None = None,
    connect_options: dict[str, Any] | None = None,
) -> Any:
    """Ensure ``workspace`` and its collection; return a connection to ``workspace``.

    Parameters
    ----------
    admin : hypha-rpc connection
        The service's connection (its own workspace).
    server_url : str
        Hypha's URL.
    workspace, collection_alias : str
        What to ensure.
    owner : str, optional
        Who must own the workspace; default: ``admin``'s effective user.
    workspace_token : str, optional
        A token that lands in ``workspace``; default: one ``admin`` generates
        (valid as long as the service's own token).
    connect_options : dict, optional
        More ``connect_to_server`` settings (e.g. ``{"logger": None}``).

    Returns
    -------
    hypha-rpc connection
        Connected to ``workspace``; the caller disconnects it.
    """
    from hypha_rpc import connect_to_server

    owner = owner or connection_user(admin)
    if not owner:
        raise StackError("cannot tell which user the service's token belongs to")
    await ensure_workspace(admin, workspace, owner)
    # a token lands in the workspace it names; Hypha refuses any other
    token = workspace_token or await admin.generate_token(
        {"workspace": workspace, "expires_in": SERVICE_TOKEN_LIFETIME_S}
    )
    ws = await connect_to_server(
        {
            "server_url": server_url,
            "token": token,
            "workspace": workspace,
            **(connect_options or {}),
        }
    )
    try:
        await ensure_collection(ws, collection_alias)
    except BaseException:
        await ws.disconnect()
        raise
    return ws
