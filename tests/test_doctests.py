"""The examples in docstrings run as tests, so they stay true.

Modules are listed by name (deploy/ and other packages being split keep
their examples out of the default suite until they are added here).
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "cellpose_finetuning.data.pairing",
    "cellpose_finetuning.data.local",
    "cellpose_finetuning.io.annotations",
    "cellpose_finetuning.io.image_files",
    "cellpose_finetuning.io.images",
    "cellpose_finetuning.io.output_names",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples: drop it from MODULES"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
