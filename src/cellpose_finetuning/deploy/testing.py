"""Throwaway embedded stacks for tests: random free ports, a temporary directory.

Used by the test suite's fixtures (and usable by anyone testing against a
real stack)::

    stack = start_test_stack(tmp_path)
    try:
        token = stack.token("alice")
        ...
    finally:
        stack.stop()
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from cellpose_finetuning.deploy.stack import GRPC_OFFSET, EmbeddedStack, StackConfig, port_is_free

__all__ = ["free_port", "free_ports", "start_test_stack", "test_stack_config"]

# Below Linux's ephemeral range (32768+), HTTP and gRPC (+10000) alike, so an
# outgoing connection cannot take a chosen port between this check and the bind.
_LOW, _HIGH = 11000, 22000


def free_port(host: str = "127.0.0.1", *, exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A port that is free on ``host``, with port + 10000 free too (SeaweedFS gRPC)."""
    for _ in range(1000):
        port = random.randint(_LOW, _HIGH)
        taken = exclude | {p + GRPC_OFFSET for p in exclude} | {p - GRPC_OFFSET for p in exclude}
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        if port_is_free(port, host) and port_is_free(port + GRPC_OFFSET, host):
            return port
    raise RuntimeError(f"no free port pair found in {_LOW}-{_HIGH}")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports as :func:`free_port` picks them."""
    ports: list[int] = []
    for _ in range(n):
        ports.append(free_port(host, exclude=set(ports)))
    return ports


def test_stack_config(data_dir: str | Path, **overrides: Any) -> StackConfig:
    """A :class:`StackConfig` on ``data_dir`` with random free ports."""
    hypha, s3, master, volume, filer = free_ports(5)
    settings: dict[str, Any] = {
        "data_dir": Path(data_dir),
        "hypha_port": hypha,
        "s3_port": s3,
        "weed_master_port": master,
        "weed_volume_port": volume,
        "weed_filer_port": filer,
        **overrides,
    }
    return StackConfig(**settings)


test_stack_config.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def start_test_stack(data_dir: str | Path, **overrides: Any) -> EmbeddedStack:
    """Start a stack on ``data_dir`` with random free ports; the caller stops it."""
    return EmbeddedStack(test_stack_config(data_dir, **overrides)).start()
