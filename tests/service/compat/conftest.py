"""A starting model that finds objects, offered by the running service by name.

The original's clients export with the default thresholds, and a BioImage.IO
package needs a sample output with objects: an untrained tiny network finds
none. The demo's trained tiny network does (``running_stack`` offers it as
``tiny-nuclei``), so the replayed clients start from it, as a user would
start from ``cpsam``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def learned_model(running_stack) -> str:
    assert (running_stack.data_dir / "models" / "tiny-nuclei.pth").is_file()
    return "tiny-nuclei"
