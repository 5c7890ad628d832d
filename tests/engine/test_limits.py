"""Memory limits inside the engine: training reads and resizing by diameter."""

from __future__ import annotations

import numpy as np
import pytest

from cellpose_finetuning.engine.inference import check_input_size
from cellpose_finetuning.engine.runs import create_local_session
from cellpose_finetuning.engine.training import run_training
from cellpose_finetuning.errors import InvalidInput


def test_training_reads_refuse_images_over_the_services_pixel_limit(
    tmp_path, tiny_model, train_pairs
):
    session = create_local_session(
        out=tmp_path / "run",
        train_pairs=train_pairs[:2],
        settings={"model": str(tiny_model), "n_epochs": 1},
        source={"max_pixels": 10_000},  # what the service records: its --max-pixels
    )
    with pytest.raises(InvalidInput, match="limit"):
        run_training(session)
    assert session.read_status().train_losses == []


@pytest.mark.parametrize(
    ("shape", "diameter", "needle"),
    [
        ((1, 64, 64), 0.01, r"diameter: 0\.01 resizes .* 192000x192000.*more than the limit"),
        ((1, 1, 1), None, r"img: image is 1x1 pixels"),
        ((1, 64, 64), 300, r"diameter: 300 resizes .* to 6x6 pixels"),
        ((2, 3, 1000, 1000), 3, r"diameter: 3 .*values, more than"),
    ],
)
def test_sizes_before_and_after_resizing_are_checked(shape, diameter, needle):
    with pytest.raises(InvalidInput, match=needle):
        check_input_size(np.zeros(shape, "uint8"), diameter, 64 * 1024 * 1024, name="img")


def test_sizes_within_the_limits_pass():
    check_input_size(np.zeros((3, 64, 64), "uint8"), 30, 64 * 1024 * 1024, name="img")
    check_input_size(np.zeros((3, 512, 512), "uint8"), 10, 64 * 1024 * 1024, name="img")
