"""The tutorial notebook runs top to bottom against the embedded stack."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.stack

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "tutorial.ipynb"


def test_tutorial_notebook_executes_and_draws_its_pictures(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_OUT", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=1800,  # per cell; the training cell takes about 2 min on 2 quiet cores
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parents[1])}},
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "completed" in outputs
    # Fine-tuning visibly helped: evaluate's before/after on the test image.
    base, tuned = map(float, re.search(r"AP@0.5 ([\d.]+) -> ([\d.]+)", outputs).groups())
    assert tuned - base >= 0.2, outputs
    assert "base_instance_metrics  AP@0.5=" in outputs
    assert "validation errors: []" in outputs
    assert "tutorial-model" in outputs
    for picture in ("training.png", "comparison.png"):
        assert (tmp_path / picture).read_bytes().startswith(b"\x89PNG")
    assert os.environ["TUTORIAL_OUT"] == str(tmp_path)
