"""The download cache's size bound: least recently used versions go, versions in use stay."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from cellpose_finetuning.data.artifacts import ArtifactFiles
from cellpose_finetuning.data.cache import CacheBound, link_tree

KIB = 1024


def _version(root: Path, key: str, size: int, used: float) -> Path:
    """A cached version ``key`` holding ``size`` bytes, last used at ``used``."""
    folder = root / key
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.tif").write_bytes(b"x" * size)
    uid, version = key.split("/")
    marker = root / uid / f".{version}.used"
    marker.touch()
    os.utime(marker, (used, used))
    return folder


def _keys(root: Path) -> set[str]:
    return {v.key for v in CacheBound(root).versions()}


def test_least_recently_used_versions_go_first_until_the_cache_fits(tmp_path):
    # created in the opposite order of their use: the use decides
    for i, key in enumerate(["u3/v1", "u1/v2", "u2/v1", "u1/v1"]):
        _version(tmp_path, key, 10 * KIB, used=1003.0 - i)
    bound = CacheBound(tmp_path, 25 * KIB)
    assert [v.key for v in bound.versions()] == ["u1/v1", "u2/v1", "u1/v2", "u3/v1"]
    assert bound.evict() == ["u1/v1", "u2/v1"]
    assert _keys(tmp_path) == {"u1/v2", "u3/v1"}
    assert sum(v.size for v in bound.versions()) <= 25 * KIB
    assert not (tmp_path / "u2").exists()  # an artifact without versions left goes too
    assert not (tmp_path / "u1" / ".v1.used").exists()
    assert bound.evict() == []  # within the bound: nothing more


def test_a_use_makes_a_version_the_most_recent(tmp_path):
    _version(tmp_path, "u1/v1", 10 * KIB, used=1000.0)
    _version(tmp_path, "u2/v1", 10 * KIB, used=2000.0)
    bound = CacheBound(tmp_path, 15 * KIB)
    with bound.pinned("u1/v1"):  # a cache hit
        pass
    assert bound.evict() == ["u2/v1"]


def test_pinned_versions_are_never_evicted_even_over_the_bound(tmp_path):
    for i, key in enumerate(["u1/v1", "u2/v1", "u3/v1"]):
        _version(tmp_path, key, 10 * KIB, used=1000.0 + i)
    bound = CacheBound(tmp_path, 5 * KIB)
    bound.acquire("u1/v1")
    bound.acquire("u1/v1")  # two users of the same version
    with bound.pinned("u2/v1"):
        assert bound.evict() == ["u3/v1"]
    assert _keys(tmp_path) == {"u1/v1", "u2/v1"}
    assert bound.evict() == ["u2/v1"]
    bound.release("u1/v1")
    assert bound.is_pinned("u1/v1") and bound.evict() == []
    bound.release("u1/v1")
    assert not bound.is_pinned("u1/v1")
    assert bound.evict() == ["u1/v1"]
    assert _keys(tmp_path) == set()


def test_a_bound_of_zero_is_unbounded(tmp_path):
    for i, key in enumerate(["u1/v1", "u2/v1"]):
        _version(tmp_path, key, 10 * KIB, used=1000.0 + i)
    assert CacheBound(tmp_path, 0).evict() == []
    assert _keys(tmp_path) == {"u1/v1", "u2/v1"}


def test_a_version_without_a_marker_counts_as_used_when_its_files_changed(tmp_path):
    """Caches from before the bound have no markers: their files' times stand in."""
    old = _version(tmp_path, "u1/v1", 10 * KIB, used=5000.0)
    (tmp_path / "u1" / ".v1.used").unlink()
    for path in (old / "images" / "a.tif", old / "images", old):
        os.utime(path, (1000.0, 1000.0))
    _version(tmp_path, "u2/v1", 10 * KIB, used=2000.0)
    assert CacheBound(tmp_path, 15 * KIB).evict() == ["u1/v1"]


def test_links_survive_eviction(tmp_path):
    folder = _version(tmp_path / "cache", "u1/v1", 3 * KIB, used=1000.0)
    own = link_tree({"images/a.tif": folder / "images" / "a.tif"}, tmp_path / "session")
    assert CacheBound(tmp_path / "cache", 1).evict() == ["u1/v1"]
    assert own["images/a.tif"].read_bytes() == b"x" * 3 * KIB


class _Reader:
    """Stands in for DirectS3Reader: every path is ``size`` bytes, read into the cache."""

    def __init__(self, size: int) -> None:
        self.size = size

    def key_prefix(self, record: dict[str, Any], version: str | None = None) -> str:
        return "s3/"

    async def stat(self, prefix: str, paths: list[str]) -> dict[str, tuple[int, float]]:
        return {p: (self.size, 1000.0) for p in paths}

    async def fetch(self, keys, local, files, arrived) -> list[str]:
        for path in keys:
            local[path].parent.mkdir(parents=True, exist_ok=True)
            local[path].write_bytes(b"y" * self.size)
            os.utime(local[path], (1000.0, 1000.0))
        arrived(len(keys))
        return []


def _record(uid: str) -> dict[str, Any]:
    return {"id": f"ws/{uid}", "_id": f"{uid}-0000-0000", "versions": [{"version": "v0"}]}


def test_each_download_leaves_the_cache_within_the_bound_and_keeps_its_own_version(tmp_path):
    files = ArtifactFiles(None, tmp_path, direct=_Reader(10 * KIB), max_bytes=25 * KIB)

    async def run() -> None:
        for uid in ("aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd"):
            got = await files.download(f"ws/{uid}", ["a.tif", "b.tif"], record=_record(uid))
            assert all(p.is_file() for p in got.values())  # the version just downloaded
            assert sum(v.size for v in files.bound.versions()) <= 25 * KIB

    asyncio.run(run())
    assert _keys(tmp_path) == {"dddddddd-0000-0000/v0"}


def test_a_version_in_use_is_kept_while_others_download(tmp_path):
    files = ArtifactFiles(None, tmp_path, direct=_Reader(10 * KIB), max_bytes=15 * KIB)

    async def run() -> None:
        async with files.fetched("ws/aaaaaaaa", ["a.tif"], record=_record("aaaaaaaa")) as got:
            await files.download("ws/bbbbbbbb", ["a.tif"], record=_record("bbbbbbbb"))
            assert got["a.tif"].is_file()  # over the bound, but in use
            assert _keys(tmp_path) == {"aaaaaaaa-0000-0000/v0", "bbbbbbbb-0000-0000/v0"}
        await files.download("ws/cccccccc", ["a.tif"], record=_record("cccccccc"))

    asyncio.run(run())
    assert _keys(tmp_path) == {"cccccccc-0000-0000/v0"}


@pytest.mark.parametrize("bound", [0, 25 * KIB])
def test_the_cache_key_is_the_records_uid_and_version(tmp_path, bound):
    files = ArtifactFiles(None, tmp_path, max_bytes=bound)
    assert files.cache_key(_record("aaaaaaaa")) == "aaaaaaaa-0000-0000/v0"
    assert files.cache_key(_record("aaaaaaaa"), "v3") == "aaaaaaaa-0000-0000/v3"
    key = files.pin(_record("aaaaaaaa"))
    assert files.bound.is_pinned(key)
    files.unpin(key)
    assert not files.bound.is_pinned(key)
