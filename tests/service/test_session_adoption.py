"""Sessions prepared before the cache was bounded get their own links at start.

Such a session's ``data.json`` points into ``<data-dir>/cache/<uid>/<version>/``;
the service's start links those files into ``<session>/dataset/`` so that
eviction cannot take them from under a continue or an export. No server.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.engine.sessions import DataSpec, SessionStore
from cellpose_finetuning.service.api import CellposeService, ServiceConfig
from cellpose_finetuning.service.training import adopt_cached_files


def _old_session(config: ServiceConfig, outside: str):
    cached = config.cache_dir / "uid1" / "v0" / "images"
    cached.mkdir(parents=True)
    for name in ("a.tif", "a_masks.tif"):
        (cached / name).write_bytes(name.encode())
    store = SessionStore(config.sessions_dir)
    data = DataSpec(
        train=[(str(cached / "a.tif"), str(cached / "a_masks.tif"))],
        test=[(outside, outside)],  # not in the cache (a CLI session's own file): left alone
    )
    return store.create(TrainingSettings(model="cpsam"), data, owner="alice")


def test_start_links_an_old_sessions_cached_files_into_the_session(tmp_path):
    outside = tmp_path / "elsewhere.tif"
    outside.write_bytes(b"x")
    config = ServiceConfig(data_dir=tmp_path / "data")
    session = _old_session(config, str(outside))

    async def start_and_close() -> None:
        svc = CellposeService(config, None)
        await svc.start()
        await svc.close()

    asyncio.run(start_and_close())
    data = session.data
    image, mask = map(str, data.train[0])
    assert image == str(session.path / "dataset" / "images" / "a.tif")
    assert mask == str(session.path / "dataset" / "images" / "a_masks.tif")
    assert data.test == [(str(outside), str(outside))]
    # eviction of the whole cached version leaves the session's files readable
    shutil.rmtree(config.cache_dir)
    assert Path(image).read_bytes() == b"a.tif"
    assert adopt_cached_files(session, config.cache_dir) == 0  # already its own
