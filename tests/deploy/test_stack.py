"""The embedded stack's supervisor: ports, tokens, secrets."""

from __future__ import annotations

import socket

import pytest
from jose import jwt

from cellpose_finetuning.deploy.stack import EmbeddedStack, StackConfig, StackError, mint_token
from tests.service.conftest import free_ports


def test_busy_port_is_named_and_nothing_starts(tmp_path):
    ports = free_ports(5)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[1]))
        busy.listen()
        stack = EmbeddedStack(
            StackConfig(
                data_dir=tmp_path,
                hypha_port=ports[0],
                s3_port=ports[1],
                weed_master_port=ports[2],
                weed_volume_port=ports[3],
                weed_filer_port=ports[4],
            )
        )
        with pytest.raises(StackError, match=f"port {ports[1]}.*--s3-port"):
            stack.start()
        assert stack.pids == {}


def test_tokens_name_the_users_workspace():
    claims = jwt.get_unverified_claims(mint_token("bob", "s3cret", expires_in=60))
    assert claims["sub"] == "bob" and "ws:ws-user-bob#a" in claims["scope"]
    assert claims["exp"] - claims["iat"] == 60


def test_secret_is_created_once_private_and_reused(tmp_path):
    first = EmbeddedStack(StackConfig(data_dir=tmp_path)).secrets
    again = EmbeddedStack(StackConfig(data_dir=tmp_path)).secrets
    assert first == again
    assert (tmp_path / "secret.json").stat().st_mode & 0o077 == 0
