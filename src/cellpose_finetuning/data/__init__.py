"""Where training data comes from: pairing file names, local folders, artifacts.

:mod:`~cellpose_finetuning.data.pairing` pairs names (pure functions, shared by
every source), :mod:`~cellpose_finetuning.data.local` lists local folders and
:mod:`~cellpose_finetuning.data.artifacts` lists and downloads Hypha artifacts
(imported on its own: it needs the client extras).
"""

from cellpose_finetuning.data.local import (
    list_files,
    pair_local,
    pair_local_specs,
    split_local_spec,
)
from cellpose_finetuning.data.pairing import (
    Pair,
    is_pattern,
    pair_files,
    safe_relpath,
    select_samples,
    spec_dir,
)

__all__ = [
    "Pair",
    "is_pattern",
    "list_files",
    "pair_files",
    "pair_local",
    "pair_local_specs",
    "safe_relpath",
    "select_samples",
    "spec_dir",
    "split_local_spec",
]
