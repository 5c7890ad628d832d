"""Unit tests of the service's permission rules (service/auth.py), without a stack.

The rules follow the artifact manager's own (``_check_permissions``); the
records here are shaped like ``artifact_manager.read`` answers. The stack
tests (test_security.py) check the same rules end to end.
"""

from __future__ import annotations

from typing import Any

import pytest

from cellpose_finetuning.errors import Forbidden, InvalidInput, NotFound
from cellpose_finetuning.service.auth import (
    ANONYMOUS,
    Caller,
    WorkspaceOwners,
    caller_from_context,
    can_read,
    can_write_children,
    readable_artifact,
    trusted_creator,
    writable_collection,
)

ALICE = Caller(id="alice", workspace="ws-user-alice", email="alice@example.org")
BOB = Caller(id="bob", workspace="ws-user-bob", email="bob@example.org")
ADMIN = Caller(id="root", workspace="ws-user-root", roles=("admin",))


def _record(workspace: str, permissions: dict[str, str] | None = None, **extra: Any) -> dict:
    return {"workspace": workspace, "config": {"permissions": permissions or {}}, **extra}


# ----------------------------------------------------------------------------- callers
def test_no_context_or_no_user_is_anonymous():
    assert caller_from_context(None) is ANONYMOUS
    assert caller_from_context({}) is ANONYMOUS
    assert caller_from_context({"user": None}) is ANONYMOUS


def test_caller_from_context_reads_id_workspace_email_and_roles():
    caller = caller_from_context(
        {
            "ws": "ws-user-alice",
            "user": {"id": "alice", "email": "a@x.org", "roles": ["admin"], "is_anonymous": False},
        }
    )
    assert caller == Caller(
        id="alice", workspace="ws-user-alice", email="a@x.org", roles=("admin",)
    )


def test_a_child_token_acts_as_its_parent_user():
    caller = caller_from_context({"user": {"id": "token-123", "parent": "alice"}})
    assert caller.id == "alice" and not caller.is_anonymous


def test_workspace_falls_back_to_the_users_current_workspace():
    caller = caller_from_context({"user": {"id": "bob", "current_workspace": "ws-user-bob"}})
    assert caller.workspace == "ws-user-bob"


@pytest.mark.parametrize(
    "user",
    [{"id": "x", "is_anonymous": True}, {"id": "anonymouz"}, {"id": ""}, {"email": "a@b.c"}],
)
def test_hyphas_anonymous_users_are_anonymous(user):
    assert caller_from_context({"user": user}).is_anonymous


def test_require_login_refuses_anonymous_and_lets_users_through():
    with pytest.raises(Forbidden, match="logged-in"):
        ANONYMOUS.require_login("training")
    ALICE.require_login("training")  # no error


# ----------------------------------------------------------------------------- reading
def test_own_workspace_is_readable_without_permissions():
    assert can_read(ALICE, _record("ws-user-alice"))
    assert not can_read(BOB, _record("ws-user-alice"))


def test_anonymous_never_owns_the_anonymous_users_workspace():
    assert not can_read(ANONYMOUS, _record("ws-user-anonymous"))


@pytest.mark.parametrize(
    ("permissions", "alice", "anonymous"),
    [
        ({"*": "r"}, True, True),
        ({"@": "r"}, True, False),
        ({"alice": "r"}, True, False),
        ({"alice@example.org": "r"}, True, False),
        ({"bob": "r"}, False, False),
        ({"ws-user-alice/*": "r"}, True, False),
        ({"ws-user-alice/@": "r"}, True, False),
        ({"ws-user-alice/alice": "r"}, True, False),
        ({"ws-user-bob/*": "r"}, False, False),
        ({"*": "l"}, False, False),  # list only: not a read
        ({"*": "rw+"}, True, True),
    ],
)
def test_permission_entries_grant_reading_as_the_artifact_manager_does(
    permissions, alice, anonymous
):
    record = _record("ws-user-carol", permissions)
    assert can_read(ALICE, record) is alice
    assert can_read(ANONYMOUS, record) is anonymous


def test_the_parent_collections_permissions_grant_reading_too():
    child = _record("ws-user-carol", parent_id="ws-user-carol/coll")
    parent = _record("ws-user-carol", {"@": "r"})
    assert not can_read(ALICE, child)
    assert can_read(ALICE, child, parent)
    assert not can_read(ANONYMOUS, child, parent)


def test_admins_read_everything():
    assert can_read(ADMIN, _record("ws-user-carol"))


# ----------------------------------------------------------------------------- writing
@pytest.mark.parametrize(
    ("permissions", "allowed"),
    [({"alice": "r"}, False), ({"alice": "r+"}, True), ({"@": "rw"}, True), ({"*": "lf+"}, True)],
)
def test_adding_children_needs_a_write_permission(permissions, allowed):
    assert can_write_children(ALICE, _record("ws-user-carol", permissions)) is allowed


def test_anonymous_may_never_add_children_even_where_anyone_may():
    assert not can_write_children(ANONYMOUS, _record("ws-user-carol", {"*": "rw+"}))
    assert can_write_children(ALICE, _record("ws-user-alice"))


# ----------------------------------------------------------------------------- trust
async def test_user_workspaces_are_owned_by_their_user_without_a_lookup():
    assert await WorkspaceOwners().owners("ws-user-alice") == {"alice"}
    assert await WorkspaceOwners().owners("lab") == frozenset()


async def test_other_workspaces_ask_the_lookup_once_per_ttl_and_a_failure_trusts_no_one():
    calls: list[str] = []

    async def lookup(workspace: str) -> dict:
        calls.append(workspace)
        if workspace == "broken":
            raise RuntimeError("server down")
        return {"owners": ["alice", "bob"]}

    owners = WorkspaceOwners(lookup)
    assert await owners.owners("lab") == {"alice", "bob"}
    assert await owners.owners("lab") == {"alice", "bob"}
    assert calls == ["lab"]  # cached
    assert await owners.owners("broken") == frozenset()


async def test_only_the_workspace_owner_or_the_service_is_a_trusted_creator():
    owners = WorkspaceOwners(service_user="svc")
    assert await trusted_creator({"workspace": "ws-user-alice", "created_by": "alice"}, owners)
    assert not await trusted_creator({"workspace": "ws-user-alice", "created_by": "eve"}, owners)
    assert await trusted_creator({"workspace": "ws-user-alice", "created_by": "svc"}, owners)
    assert not await trusted_creator({"workspace": "ws-user-alice"}, owners)
    assert not await trusted_creator({"created_by": "alice"}, None)


class _Records:
    """Records by id, read as ``ArtifactFiles.read`` answers (missing: NotFound)."""

    def __init__(self, records: dict[str, dict], owners: WorkspaceOwners) -> None:
        self.records, self.owners = records, owners

    async def read(self, artifact_id: str) -> dict:
        if artifact_id not in self.records:
            raise NotFound("artifact", artifact_id)
        return {"id": artifact_id, **self.records[artifact_id]}


def _store(records: dict[str, dict] | None = None) -> _Records:
    return _Records(records or {}, WorkspaceOwners(service_user="svc"))


async def test_readable_artifact_answers_missing_and_not_yours_with_one_message():
    store = _store({"ws-user-carol/data": _record("ws-user-carol", created_by="carol")})
    with pytest.raises(NotFound) as hidden:
        await readable_artifact(store, "ws-user-carol/data", ALICE)
    with pytest.raises(NotFound) as missing:
        await readable_artifact(store, "ws-user-carol/nothing", ALICE)
    assert str(hidden.value).replace("data", "X") == str(missing.value).replace("nothing", "X")


async def test_readable_artifact_refuses_what_someone_else_wrote_into_a_workspace():
    planted = _record("ws-user-alice", {"*": "r"}, created_by="eve")
    store = _store({"ws-user-alice/data": planted})
    with pytest.raises(Forbidden, match="'eve'"):  # the owner is told, to replace it
        await readable_artifact(store, "ws-user-alice/data", ALICE)
    with pytest.raises(NotFound):  # anyone else: as if it did not exist
        await readable_artifact(store, "ws-user-alice/data", BOB)


async def test_readable_artifact_returns_a_trusted_readable_record():
    store = _store({"ws-user-alice/data": _record("ws-user-alice", {"@": "r"}, created_by="alice")})
    record = await readable_artifact(store, "http://host/ws-user-alice/artifacts/data", BOB)
    assert record["id"] == "ws-user-alice/data"


async def test_readable_artifact_needs_a_store_and_a_valid_id():
    with pytest.raises(InvalidInput, match="no artifact store"):
        await readable_artifact(None, "ws/alias", ALICE)
    with pytest.raises(InvalidInput):
        await readable_artifact(_store(), "not an id", ALICE)


async def test_writable_collection_checks_type_and_write_permission():
    coll = {"created_by": "carol", "type": "collection"}
    store = _store(
        {
            "ws-user-carol/models": _record("ws-user-carol", {"@": "r"}, **coll),
            "ws-user-carol/open": _record("ws-user-carol", {"@": "rw+"}, **coll),
            "ws-user-carol/data": _record("ws-user-carol", {"@": "rw+"}, created_by="carol"),
        }
    )
    with pytest.raises(Forbidden, match="may not add"):
        await writable_collection(store, "ws-user-carol/models", ALICE)
    with pytest.raises(InvalidInput, match="not a collection"):
        await writable_collection(store, "ws-user-carol/data", ALICE)
    assert (await writable_collection(store, "ws-user-carol/open", ALICE))["id"].endswith("open")
    with pytest.raises(Forbidden, match="anonymous"):
        await writable_collection(store, "ws-user-carol/open", ANONYMOUS)
