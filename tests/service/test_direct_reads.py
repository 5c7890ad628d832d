"""Dataset files read straight from the embedded stack's S3 (issue #22 point 3), on the real stack.

The direct reader derives each file's S3 key from hypha 0.21.137's layout
(``<ws>/artifacts/<_id>/v<index>/<path>``); reading back files uploaded
through the artifact manager proves the derivation. Where it cannot find a
key, the file comes through a presigned URL; the service's permission checks
still come before any read.
"""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpose_finetuning.client import upload_folder
from cellpose_finetuning.data.artifacts import ArtifactFiles, FileInfo, upload_files
from cellpose_finetuning.data.s3direct import DirectS3Reader, S3Access

pytestmark = pytest.mark.stack

ALICE_WS = "ws-user-alice"


@pytest.fixture(scope="module")
async def alice(running_stack):
    server = await running_stack.connect("alice")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


def _folder(root: Path, seed: int, n: int = 5) -> Path:
    """``n`` small TIFFs of different sizes (``images/`` and ``images/deep/``)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / "images" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(sub / f"f{i}.tif", rng.integers(0, 255, (64 + i, 64), dtype=np.uint8))
    return root


def _paths(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.tif"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_direct_reads_give_the_presigned_bytes_and_reuse_the_cache(
    alice, running_stack, tmp_path
):
    server, _ = alice
    folder = _folder(tmp_path / "src", seed=1)
    artifact = await upload_folder(server, folder, alias="direct-same-bytes")
    am = await server.get_service("public/artifact-manager")
    paths = _paths(folder)
    reader = DirectS3Reader(running_stack.stack.s3_access())
    try:
        presigned = await ArtifactFiles(am, tmp_path / "p").download(artifact, paths)
        direct_files = ArtifactFiles(am, tmp_path / "d", direct=reader)
        direct = await direct_files.download(artifact, paths)
        assert (reader.reads, reader.fallbacks) == (len(paths), 0)
        for p in paths:
            assert _sha(direct[p]) == _sha(presigned[p]) == _sha(folder / p), p
            assert direct[p].stat().st_mtime == presigned[p].stat().st_mtime
        record = dict(await am.read(artifact))
        assert direct[paths[0]].is_relative_to(tmp_path / "d" / record["_id"])
        # listed from S3 directly, the files read as the artifact manager lists them
        by_hypha = await direct_files.stat(artifact, paths)
        prefix = direct_files.direct.key_prefix(record)
        assert await direct_files._direct_stat(prefix, paths) == by_hypha
        # the same files again: nothing is read, from S3 or through a URL
        before = {p: direct[p].stat().st_mtime_ns for p in paths}
        again = await direct_files.download(artifact, paths)
        assert reader.reads == len(paths)
        assert {p: again[p].stat().st_mtime_ns for p in paths} == before
        # a cached file changed locally is read again
        direct[paths[0]].write_bytes(b"tampered")
        await direct_files.download(artifact, paths)
        assert reader.reads == len(paths) + 1
        assert _sha(direct[paths[0]]) == _sha(folder / paths[0])
    finally:
        reader.close()


async def test_each_committed_version_is_read_from_its_own_keys(alice, running_stack, tmp_path):
    server, _ = alice
    v0 = _folder(tmp_path / "v0", seed=2, n=1)
    artifact = await upload_folder(server, v0, alias="direct-versions")
    am = await server.get_service("public/artifact-manager")
    v1 = _folder(tmp_path / "v1", seed=3, n=1)
    await am.edit(artifact, stage=True, version="new")
    await upload_files(am, artifact, {"images/f0.tif": v1 / "images" / "f0.tif"}, commit=False)
    await am.commit(artifact)
    record = dict(await am.read(artifact))
    names = [v["version"] for v in record["versions"]]
    assert len(names) == 2, names
    reader = DirectS3Reader(running_stack.stack.s3_access())
    try:
        files = ArtifactFiles(am, tmp_path / "cache", direct=reader)
        latest = await files.download(artifact, ["images/f0.tif"])
        first = await files.download(artifact, ["images/f0.tif"], version=names[0])
        assert (reader.reads, reader.fallbacks) == (2, 0)
        assert _sha(latest["images/f0.tif"]) == _sha(v1 / "images" / "f0.tif")
        assert _sha(first["images/f0.tif"]) == _sha(v0 / "images" / "f0.tif")
        assert latest["images/f0.tif"] != first["images/f0.tif"]  # cached apart by version
    finally:
        reader.close()


async def test_keys_the_reader_cannot_find_come_through_presigned_urls(
    alice, running_stack, tmp_path
):
    server, _ = alice
    folder = _folder(tmp_path / "src", seed=4, n=3)
    artifact = await upload_folder(server, folder, alias="direct-fallback")
    am = await server.get_service("public/artifact-manager")
    paths = _paths(folder)
    right = running_stack.stack.s3_access()
    # a layout that is not where the artifact manager put the files: every key is missing
    elsewhere = S3Access(**{**right.__dict__, "artifacts_dir": "not-the-artifacts-dir"})
    for access, n in ((elsewhere, len(paths)), (right, 1)):
        reader = DirectS3Reader(access)
        dest = tmp_path / f"cache-{n}"
        listed = await ArtifactFiles(am, dest).stat(artifact, paths)
        if n == 1:  # the listing says another size than S3 holds: not read directly
            p = paths[0]
            listed[p] = FileInfo(listed[p].size + 1, listed[p].last_modified)
        try:
            got = await ArtifactFiles(am, dest, direct=reader).download(
                artifact, paths, files=listed
            )
        finally:
            reader.close()
        assert reader.fallbacks == n and reader.reads == len(paths) - n
        for p in paths:
            assert _sha(got[p]) == _sha(folder / p), p


def _service():
    """The service ``serve`` runs in this process for the test session."""
    from cellpose_finetuning.service.api import CellposeService

    found = [o for o in gc.get_objects() if isinstance(o, CellposeService)]
    services = [s for s in found if s.artifacts is not None and s.artifacts.direct is not None]
    assert len(services) == 1, "serve on the embedded stack gives its service a direct reader"
    return services[0]


async def test_the_service_reads_directly_only_after_its_permission_check(
    alice, running_stack, tmp_path
):
    a_server, a_svc = alice
    folder = _folder(tmp_path / "src", seed=5, n=1)
    artifact = await upload_folder(a_server, folder, alias="direct-private")
    record = await (await a_server.get_service("public/artifact-manager")).read(artifact)
    reader = _service().artifacts.direct
    assert reader.access.secret_access_key not in repr(reader.access)
    reads = reader.reads
    bob = await running_stack.connect("bob")
    try:
        b_svc = await bob.get_service(running_stack.service_id)
        with pytest.raises(Exception, match="artifact not found"):
            await b_svc.infer(model="tiny", artifact=artifact, image_paths=["images/f0.tif"])
    finally:
        await bob.disconnect()
    assert reader.reads == reads
    assert not (running_stack.data_dir / "cache" / record["_id"]).exists()
    got = await a_svc.infer(model="tiny", artifact=artifact, image_paths=["images/f0.tif"])
    want = await a_svc.infer(model="tiny", input_arrays=[tifffile.imread(folder / "images/f0.tif")])
    np.testing.assert_array_equal(got[0]["output"], want[0]["output"])
    assert reader.reads == reads + 1
    cached = running_stack.data_dir / "cache" / record["_id"]
    assert [_sha(p) for p in cached.rglob("f0.tif")] == [_sha(folder / "images" / "f0.tif")]
