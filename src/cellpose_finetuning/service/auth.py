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

We do not trust "it is in alice's workspace" as proof that alice created it
for writes: on hypha 0.21.137 anyone can create artifacts in another user's
workspace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cellpose_finetuning.errors import Forbidden

__all__ = ["ANONYMOUS", "Caller", "caller_from_context", "can_read", "can_write_children"]

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
