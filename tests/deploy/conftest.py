"""A real embedded stack (SeaweedFS + Hypha), started once per test session."""

from __future__ import annotations

import pytest

from cellpose_finetuning.deploy.testing import start_test_stack


@pytest.fixture(scope="session")
def hypha_stack(tmp_path_factory):
    """A running :class:`EmbeddedStack` on random free ports; stopped after the session."""
    stack = start_test_stack(tmp_path_factory.mktemp("hypha-stack"))
    try:
        yield stack
    finally:
        stack.stop()
