"""The stack package's pure parts: configuration checks, the token rule, connection.json.

No process is started here; ``test_stack.py`` runs the real servers.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime

import pytest
from jose import jwt

from cellpose_finetuning import names
from cellpose_finetuning.deploy.stack import (
    GRPC_OFFSET,
    StackConfig,
    StackError,
    check_token_lifetime,
    mint_token,
    read_connection_file,
)
from cellpose_finetuning.deploy.stack.connection import (
    CONNECTION_KEYS,
    connection_record,
    remove_connection_file,
    write_connection_file,
)
from cellpose_finetuning.deploy.stack.files import write_private
from cellpose_finetuning.deploy.stack.tokens import LONGER_TOKEN_HINT
from cellpose_finetuning.errors import InvalidInput

SECRET = "s" * 32


# --------------------------------------------------------------------------- config
def test_the_default_config_takes_every_name_from_names():
    config = StackConfig()
    assert config.data_dir == names.DEFAULT_DATA_DIR
    assert (config.host, config.hypha_port, config.s3_port) == (
        names.DEFAULT_HOST,
        names.DEFAULT_HYPHA_PORT,
        names.DEFAULT_S3_PORT,
    )
    assert (config.weed_master_port, config.weed_volume_port, config.weed_filer_port) == (
        names.WEED_MASTER_PORT,
        names.WEED_VOLUME_PORT,
        names.WEED_FILER_PORT,
    )
    assert config.workspace == names.DEFAULT_WORKSPACE
    assert config.collection_alias == names.DEFAULT_COLLECTION_ALIAS
    assert (config.service_user, config.default_user) == (names.SERVICE_USER, names.DEFAULT_USER)
    assert config.server_url == f"http://{names.DEFAULT_HOST}:{names.DEFAULT_HYPHA_PORT}"


def test_the_port_plan_has_every_seaweedfs_port_and_its_grpc_side():
    plan = StackConfig(hypha_port=20000, s3_port=20001).port_plan()
    ports = [port for _, port, _ in plan]
    assert len(plan) == 9  # Hypha + 4 SeaweedFS servers, each with gRPC
    assert ports[:3] == [20000, 20001, 20001 + GRPC_OFFSET]
    assert len(set(ports)) == 9
    options = {option for option, port, what in plan if "gRPC" in what}
    assert options == {"--s3-port", "--weed-master-port", "--weed-volume-port", "--weed-filer-port"}


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"s3_port": 60000}, "--s3-port: SeaweedFS S3 port 60000 is outside 1-55535"),
        ({"hypha_port": 0}, "--hypha-port: Hypha port 0 is outside 1-65535"),
        ({"hypha_port": "9527"}, "--hypha-port: '9527' is not a port number"),
        ({"hypha_port": True}, "not a port number"),
        ({"weed_master_port": 9483}, "port 9483 is also SeaweedFS S3's port"),
        ({"hypha_port": 9483 + GRPC_OFFSET}, "--s3-port: port 19483 is also Hypha's port"),
        ({"workspace": "Bioimage"}, "workspace: 'Bioimage': lowercase"),
        ({"workspace": "nohyphen"}, "at least one hyphen"),
        ({"collection_alias": "a/b"}, "collection_alias"),
        ({"service_user": "a b"}, "service_user: 'a b' is not a user id"),
    ],
)
def test_a_bad_setting_is_named(settings, needle):
    with pytest.raises(InvalidInput, match=needle.replace("(", r"\(")):
        StackConfig(**settings)


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(InvalidInput, match="stack configuration") as caught:
        StackConfig(workspace="X", default_user="", collection_alias="")
    for what in ("workspace", "default_user", "collection_alias"):
        assert what in str(caught.value)


# --------------------------------------------------------------------------- tokens
def _token(expires_in: float) -> str:
    exp = int(time.time() + expires_in)
    return jwt.encode({"sub": "dave", "exp": exp}, SECRET, algorithm="HS256")


def test_a_token_lasting_more_than_a_day_passes_unchanged():
    token = mint_token("dave", secret=SECRET, expires_in=names.MIN_TOKEN_LIFETIME_S + 600)
    assert check_token_lifetime(token) == token


def test_a_token_expiring_within_a_day_is_refused_saying_how_to_get_a_longer_one():
    token = mint_token("dave", secret=SECRET, expires_in=3 * 3600)
    with pytest.raises(InvalidInput, match=r"expires in 3\.0 h") as caught:
        check_token_lifetime(token)
    assert LONGER_TOKEN_HINT in str(caught.value)
    assert "24 h" in str(caught.value)


def test_an_expired_token_is_refused_even_where_a_short_one_is_enough():
    with pytest.raises(InvalidInput, match="expired at"):
        check_token_lifetime(_token(-60), min_lifetime_s=0)
    short = _token(60)
    assert check_token_lifetime(short, min_lifetime_s=0) == short
    # ``now`` moves the clock: an hour later the same token has expired
    with pytest.raises(InvalidInput, match="expired at"):
        check_token_lifetime(short, min_lifetime_s=0, now=time.time() + 3600)


def test_a_token_without_a_readable_expiry_is_left_to_the_server():
    assert check_token_lifetime("not-a-jwt") == "not-a-jwt"
    no_exp = jwt.encode({"sub": "dave"}, SECRET, algorithm="HS256")
    assert check_token_lifetime(no_exp) == no_exp


def test_minted_tokens_take_their_lifetimes_from_names():
    claims = jwt.get_unverified_claims(mint_token("dave", secret=SECRET))
    assert claims["exp"] - claims["iat"] == names.USER_TOKEN_LIFETIME_S


# --------------------------------------------------------------------------- connection.json
def test_a_connection_record_has_every_key_and_no_user_without_a_token(tmp_path):
    record = connection_record(
        server_url="http://h:1",
        workspace="ws-a",
        service_id="ws-a/x",
        data_dir=tmp_path,
        user="alice",
    )
    assert tuple(record) == CONNECTION_KEYS
    assert record["user"] is None and record["token"] is None
    assert record["pid"] == os.getpid()
    assert record["data_dir"] == str(tmp_path)
    assert datetime.fromisoformat(record["started_at"]).tzinfo is not None
    when = datetime(2026, 1, 2, tzinfo=UTC)
    assert (
        connection_record(
            server_url="u", workspace="w", service_id="w/x", data_dir=tmp_path, started_at=when
        )["started_at"]
        == when.isoformat()
    )


def test_the_connection_file_is_written_private_read_back_and_removed(tmp_path):
    record = connection_record(
        server_url="http://h:1",
        workspace="ws-a",
        service_id="ws-a/x",
        data_dir=tmp_path,
        user="alice",
        token="t0k3n",
        backend="local",
    )
    path = write_connection_file(tmp_path, record)
    assert path == tmp_path / "connection.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_connection_file(tmp_path) == record
    assert json.loads(path.read_text())["user"] == "alice"
    remove_connection_file(tmp_path)
    remove_connection_file(tmp_path)  # nothing there: no error
    with pytest.raises(StackError, match="is 'cellpose-finetuning serve' running"):
        read_connection_file(tmp_path)


def test_the_connection_file_refuses_keys_of_its_own(tmp_path):
    record = connection_record(server_url="u", workspace="w", service_id="w/x", data_dir=tmp_path)
    with pytest.raises(ValueError, match="extra_key"):
        write_connection_file(tmp_path, {**record, "extra_key": 1})
    record.pop("backend")
    with pytest.raises(ValueError, match="backend"):
        write_connection_file(tmp_path, record)
    assert not (tmp_path / "connection.json").exists()


def test_private_writes_replace_atomically_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / "secret.txt"
    write_private(path, "one")
    write_private(path, "two")
    assert path.read_text() == "two"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.txt"]
