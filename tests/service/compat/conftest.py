"""A starting model that finds objects, offered by the running service by name.

The original's clients export with the default thresholds, and a BioImage.IO
package needs a sample output with objects: an untrained tiny network finds
none. The demo's trained tiny network (``learned_tiny``) does, so the
replayed clients start from it, as a user would start from ``cpsam``.
"""

from __future__ import annotations

import shutil

import pytest

#: The name the service offers the learned network under (a checkpoint in its models folder).
LEARNED = "tiny-nuclei"


@pytest.fixture(scope="session")
def learned_model(running_stack, learned_tiny) -> str:
    shutil.copy(learned_tiny, running_stack.data_dir / "models" / f"{LEARNED}.pth")
    return LEARNED
