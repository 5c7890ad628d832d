"""Who is calling, and what they may read or write.

The caller's identity comes from the RPC context Hypha attaches to every call
of a ``require_context`` service; it cannot be forged by the caller. The
service reads artifacts with its own (privileged) connection, so before it
touches a dataset for a caller it checks that the *caller* may read it,
following the artifact manager's own permission rules
(``hypha.artifact.ArtifactController._check_permissions``): the caller's own
workspace, then ``config.permissions`` entries for the caller's id or e-mail,
``@`` (any logged-in user), ``*`` (anyone) and ``<workspace>/<who>``, on the
artifact or its parent collection.

We do not trust "it is in alice's workspace" as proof that alice made it: on
hypha 0.21.137 anyone, even anonymous, can create artifacts in another user's
workspace (``am.create(workspace=...)`` skips the workspace check), and
``overwrite=True`` replaces an existing artifact's config, permissions included.
Both leave the attacker's id in the record's ``created_by``, so the service only
uses an artifact or collection whose ``created_by`` is an owner of its workspace
(or the service itself): :func:`readable_artifact`, :func:`writable_collection`.

Anything refused for not being the caller's is answered exactly like something
that does not exist (:func:`cellpose_finetuning.errors.not_found_or_hidden`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cellpose_finetuning.errors import (
    CellposeFinetuningError,
    Forbidden,
    InvalidInput,
    NotFound,
    not_found_or_hidden,
)

if TYPE_CHECKING:
    from cellpose_finetuning.data.artifacts import ArtifactFiles

__all__ = [
    "ANONYMOUS",
    "Caller",
    "WorkspaceOwners",
    "caller_from_context",
    "can_read",
    "can_write_children",
    "readable_artifact",
    "trusted_creator",
    "writable_collection",
]

_READ = {"r", "r+", "rw", "rw+", "*"}
_ADD_CHILD = {"r+", "rw", "rw+", "*", "lv+", "lf+"}


@dataclass(frozen=True)
class Caller:
    """The user behind an RPC call."""

    id: str
    workspace: str | None
    email: str | None = None
    is_anonymous: bool = False
    roles: tuple[str, ...] = ()

    def require_login(self, action: str) -> None:
        """Raise :class:`Forbidden` for anonymous callers."""
        if self.is_anonymous:
            raise Forbidden(
                f"{action} needs a logged-in user; anonymous callers may only run 'cpsam' "
                "inference on arrays they send"
            )


#: Used when there is no context (local, in-process calls).
ANONYMOUS = Caller(id="anonymous", workspace=None, is_anonymous=True)


def caller_from_context(context: dict[str, Any] | None) -> Caller:
    """Build the :class:`Caller` from a Hypha RPC context (``None`` = anonymous)."""
    if not context or not context.get("user"):
        return ANONYMOUS
    user = dict(context["user"])
    anonymous = bool(user.get("is_anonymous")) or user.get("id") in (None, "", "anonymouz")
    # A child token (generate_token) carries the real user in `parent`.
    uid = user.get("parent") or user.get("id") or "anonymous"
    workspace = context.get("ws") or user.get("current_workspace")
    return Caller(
        id=str(uid),
        workspace=workspace,
        email=user.get("email"),
        is_anonymous=anonymous,
        roles=tuple(user.get("roles") or ()),
    )


def _grants(permissions: dict[str, Any], caller: Caller, allowed: set[str]) -> bool:
    for key, value in (permissions or {}).items():
        if value not in allowed:
            continue
        if "/" in key:
            ws, who = key.split("/", 1)
            if ws == caller.workspace and (
                who == "*"
                or (who == "@" and not caller.is_anonymous)
                or who in (caller.id, caller.email)
            ):
                return True
        elif (
            key == "*"
            or (key == "@" and not caller.is_anonymous)
            or key in (caller.id, caller.email)
        ):
            return True
    return False


def _permissions(record: dict[str, Any] | None) -> dict[str, Any]:
    return dict(((record or {}).get("config") or {}).get("permissions") or {})


def can_read(
    caller: Caller, artifact: dict[str, Any], parent: dict[str, Any] | None = None
) -> bool:
    """Whether ``caller`` may read ``artifact`` (a record from ``artifact_manager.read``)."""
    if "admin" in caller.roles:
        return True
    if not caller.is_anonymous and artifact.get("workspace") == f"ws-user-{caller.id}":
        return True
    return _grants(_permissions(artifact), caller, _READ) or _grants(
        _permissions(parent), caller, _READ
    )


def can_write_children(caller: Caller, collection: dict[str, Any]) -> bool:
    """Whether ``caller`` may add a child to ``collection``."""
    if caller.is_anonymous:
        return False
    if "admin" in caller.roles or collection.get("workspace") == f"ws-user-{caller.id}":
        return True
    return _grants(_permissions(collection), caller, _ADD_CHILD)


USER_WORKSPACE_PREFIX = "ws-user-"


class WorkspaceOwners:
    """Who owns a workspace: the users whose artifacts there the service trusts.

    ``ws-user-<id>`` is owned by ``<id>``; any other workspace's owners come
    from ``lookup`` (the server's ``get_workspace_info``), cached for a minute.
    Without ``lookup``, or when it fails, such a workspace has no trusted owner.

    Parameters
    ----------
    lookup : callable, optional
        ``async (workspace) -> {"owners": [...], ...}``.
    service_user : str, optional
        The service's own user id: what the service created (exported models)
        is trusted wherever it is.
    """

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[Any]] | None = None,
        service_user: str | None = None,
        ttl_s: float = 60.0,
    ) -> None:
        self.lookup = lookup
        self.service_user = service_user
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    async def owners(self, workspace: str) -> frozenset[str]:
        """Owner ids of ``workspace`` (empty when unknown)."""
        if workspace.startswith(USER_WORKSPACE_PREFIX):
            return frozenset({workspace[len(USER_WORKSPACE_PREFIX) :]})
        hit = self._cache.get(workspace)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        owners: frozenset[str] = frozenset()
        if self.lookup is not None:
            try:
                info = dict(await self.lookup(workspace) or {})
                owners = frozenset(str(o) for o in info.get("owners") or ())
            except Exception:
                owners = frozenset()
        self._cache[workspace] = (time.monotonic(), owners)
        return owners


async def trusted_creator(record: dict[str, Any], owners: WorkspaceOwners | None) -> bool:
    """Whether ``record`` was created (and not since rewritten) by its workspace's owner.

    ``created_by`` is set by the artifact manager from the creating (or
    overwriting) caller's identity, so it cannot be chosen by an attacker.
    """
    owners = owners or WorkspaceOwners()
    creator = record.get("created_by")
    workspace = str(record.get("workspace") or "")
    if not creator or not workspace:
        return False
    if owners.service_user and creator == owners.service_user:
        return True
    return creator in await owners.owners(workspace)


async def _record(artifacts: ArtifactFiles, artifact_id: str, kind: str) -> dict[str, Any]:
    try:
        return await artifacts.read(artifact_id)
    except (NotFound, Forbidden):
        raise not_found_or_hidden(kind, artifact_id) from None


async def readable_artifact(
    artifacts: ArtifactFiles | None,
    artifact_id: str,
    caller: Caller,
    *,
    arg: str = "artifact",
    kind: str = "artifact",
) -> dict[str, Any]:
    """The record of an artifact the caller may read and the service may trust.

    Parameters
    ----------
    artifacts : ArtifactFiles
        The service's artifact store (its ``owners`` attribute says who owns
        which workspace).
    artifact_id : str
        ``workspace/alias`` or an artifact URL.
    caller : Caller
        Who asks.
    arg, kind : str
        How to name the argument and the thing in errors.

    Returns
    -------
    dict
        The artifact's record (``id`` is ``workspace/alias``, ``_id`` the internal id).

    Raises
    ------
    NotFound
        The same message whether it is missing, not readable by the caller, or
        created/rewritten by someone other than its workspace's owner.
    Forbidden
        Only to the workspace's owner, for an artifact in their workspace that
        someone else created or rewrote (so they know to replace it).
    """
    from cellpose_finetuning.data.artifacts import parse_artifact_id

    artifact_id = parse_artifact_id(artifact_id, arg)
    if artifacts is None:
        raise InvalidInput(arg, "this service has no artifact store")
    record = await _record(artifacts, artifact_id, kind)
    parent = None
    if record.get("parent_id"):
        try:
            parent = await artifacts.read(record["parent_id"])
        except CellposeFinetuningError:
            parent = None
    if not can_read(caller, record, parent):
        raise not_found_or_hidden(kind, artifact_id)
    owners: WorkspaceOwners | None = getattr(artifacts, "owners", None)
    # The original web frontend uploads inference inputs into the *service's* workspace:
    # there, what callers created themselves they may use for themselves. Nowhere else: an
    # artifact of alice's that mallory rewrote carries mallory's created_by too.
    own = (
        not caller.is_anonymous
        and record.get("created_by") == caller.id
        and owners is not None
        and owners.service_user is not None
        and owners.service_user in await owners.owners(record["workspace"])
    )
    if not own and not await trusted_creator(record, owners):
        owners = owners or WorkspaceOwners()
        if not caller.is_anonymous and caller.id in await owners.owners(record["workspace"]):
            raise Forbidden(
                f"{arg}: {artifact_id!r} in your workspace was created or last rewritten by "
                f"{record.get('created_by')!r}, not by you; the service does not use it. "
                "Delete it and upload it again."
            )
        raise not_found_or_hidden(kind, artifact_id)
    return record


async def writable_collection(
    artifacts: ArtifactFiles | None, collection_id: str, caller: Caller, *, arg: str = "collection"
) -> dict[str, Any]:
    """The record of a trusted collection the caller may add models to.

    Raises
    ------
    NotFound
        Missing, not readable, or not trusted (see :func:`readable_artifact`).
    InvalidInput
        Not a collection.
    Forbidden
        The caller may read it but not add to it.
    """
    if caller.is_anonymous:
        raise Forbidden(f"{arg}: anonymous callers may not add models to collections")
    record = await readable_artifact(artifacts, collection_id, caller, arg=arg, kind="collection")
    if record.get("type") != "collection":
        raise InvalidInput(arg, f"{record['id']!r} is not a collection")
    if not can_write_children(caller, record):
        raise Forbidden(f"{arg}: you may not add models to {record['id']!r}")
    return record
