"""Per-user quotas of the service object itself (no stack needed): sessions kept."""

from __future__ import annotations

import pytest

from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.engine.sessions import DataSpec
from cellpose_finetuning.service.api import CellposeService, ServiceConfig

MALLORY = {"user": {"id": "mallory", "is_anonymous": False}, "ws": "ws-user-mallory"}
BOB = {"user": {"id": "bob", "is_anonymous": False}, "ws": "ws-user-bob"}


async def test_a_user_cannot_keep_more_sessions_than_the_cap(tmp_path):
    service = CellposeService(ServiceConfig(data_dir=tmp_path, max_sessions_per_user=3))
    settings = TrainingSettings(model="cpsam", n_epochs=1)
    for _ in range(3):  # e.g. failed or stopped sessions made in a loop
        session = service.sessions.create(settings, DataSpec(train=[]), owner="mallory")
        session.update_status(status_type="failed")
    args = dict(
        artifact="ws-user-mallory/data",
        train_images="images/",
        train_annotations="annotations/",
        model="cpsam",
        n_epochs=1,
    )
    with pytest.raises(ValueError, match=r"you keep 3 training sessions \(limit 3\)"):
        await service.start_training(**args, context=MALLORY)
    # bob is not affected by mallory's sessions (he gets past the quota to the dataset)
    with pytest.raises(ValueError, match="artifact store"):
        await service.start_training(**args, context=BOB)
    assert len(service.sessions.list(owner="mallory")) == 3
