"""Attacks of a second user (``mallory``) and anonymous callers on ``alice``'s work.

Each test is written as the attack of docs/reliability.md's threat table: it
does what an attacker with an account can do on hypha 0.21.137 (including the
platform's gap: ``am.create(workspace=<alice's>, ...)`` and ``overwrite=True``)
and asserts that the attack fails and that alice's data and results are intact.
"""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpose_finetuning.client import upload_folder
from cellpose_finetuning.data.artifacts import upload_files
from tests.helpers import follow_status

pytestmark = pytest.mark.stack

ALICE_WS = "ws-user-alice"


@pytest.fixture(scope="module")
async def alice(running_stack):
    server = await running_stack.connect("alice")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
async def mallory(running_stack):
    server = await running_stack.connect("mallory")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
async def anonymous(running_stack):
    server = await running_stack.connect(None)
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


def _image(seed: int, shape=(64, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(20, 5, shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(6):
        cy, cx = rng.integers(8, shape[0] - 8, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] += 150
    return img.clip(0, 255).astype("uint8")


def _folder(root: Path, seed: int) -> Path:
    """A one-image dataset (images/a.tif) whose pixels depend on ``seed``."""
    (root / "images").mkdir(parents=True)
    tifffile.imwrite(root / "images" / "a.tif", _image(seed))
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _plant(server, workspace: str, alias: str, folder: Path, **create) -> dict:
    """The platform gap: create (or overwrite) an artifact in someone else's workspace."""
    am = await server.get_service("public/artifact-manager")
    art = await am.create(
        workspace=workspace,
        alias=alias,
        type=create.pop("type", "dataset"),
        stage=True,
        manifest={"name": alias, "description": "planted"},
        config=create.pop("config", {"permissions": {"mallory": "*"}}),
        **create,
    )
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    await upload_files(am, art["id"], files)
    return dict(await am.read(art["id"]))


def _same_message(err_a: BaseException, name_a: str, err_b: BaseException, name_b: str) -> None:
    """Two refusals read the same once the names the caller gave are taken out."""
    a = str(err_a).replace(name_a, "NAME")
    b = str(err_b).replace(name_b, "NAME")
    # keep only the final line of a remote traceback (what a client shows)
    a, b = a.strip().splitlines()[-1], b.strip().splitlines()[-1]
    assert a == b, (a, b)


# ---------------------------------------------------------------- finding 1 and 5: datasets
async def test_a_planted_dataset_is_refused_and_cannot_poison_alices_later_upload(
    alice, mallory, running_stack, tmp_path
):
    m_server, m_svc = mallory
    planted = await _plant(m_server, ALICE_WS, "alice-data2", _folder(tmp_path / "m", seed=1))
    assert planted["workspace"] == ALICE_WS and planted["created_by"] == "mallory"
    # mallory cannot get the service to read it (which would fill the cache) ...
    with pytest.raises(Exception, match="artifact not found") as err:
        await m_svc.infer(model="tiny", artifact=planted["id"], image_paths=["images/a.tif"])
    with pytest.raises(Exception, match="artifact not found"):
        await m_svc.start_training(
            artifact=planted["id"],
            train_images="images/",
            train_annotations="images/",
            model="tiny",
            n_epochs=1,
        )
    # ... and is told exactly what she is told about an artifact that does not exist
    with pytest.raises(Exception) as missing:
        await m_svc.infer(model="tiny", artifact=f"{ALICE_WS}/nothing", image_paths=["x.tif"])
    _same_message(err.value, planted["id"], missing.value, f"{ALICE_WS}/nothing")
    # alice is told the truth about the one in her workspace
    a_server, a_svc = alice
    with pytest.raises(Exception, match="created or last rewritten by 'mallory'"):
        await a_svc.infer(model="tiny", artifact=planted["id"], image_paths=["images/a.tif"])
    am = await m_server.get_service("public/artifact-manager")
    await am.delete(planted["id"], delete_files=True)

    # alice now uploads her real dataset under the same alias: her files are used
    real = _folder(tmp_path / "a", seed=2)
    artifact = await upload_folder(a_server, real, alias="alice-data2")
    got = await a_svc.infer(model="tiny", artifact=artifact, image_paths=["images/a.tif"])
    want = await a_svc.infer(model="tiny", input_arrays=[_image(2)])
    np.testing.assert_array_equal(got[0]["output"], want[0]["output"])
    cached = [p for p in (running_stack.data_dir / "cache").rglob("a.tif")]
    assert _sha(real / "images" / "a.tif") in {_sha(p) for p in cached}
    assert _sha(tmp_path / "m" / "images" / "a.tif") not in {_sha(p) for p in cached}


async def test_a_reuploaded_dataset_is_never_served_from_stale_cached_files(
    alice, running_stack, tmp_path
):
    server, svc = alice
    am = await server.get_service("public/artifact-manager")
    first = await upload_folder(server, _folder(tmp_path / "v1", seed=3), alias="reuploaded")
    await svc.infer(model="tiny", artifact=first, image_paths=["images/a.tif"])
    old_id = (await am.read(first))["_id"]
    await am.delete(first, delete_files=True)
    second = await upload_folder(server, _folder(tmp_path / "v2", seed=4), alias="reuploaded")
    got = await svc.infer(model="tiny", artifact=second, image_paths=["images/a.tif"])
    want = await svc.infer(model="tiny", input_arrays=[_image(4)])
    np.testing.assert_array_equal(got[0]["output"], want[0]["output"])
    record = await am.read(second)
    assert record["_id"] != old_id  # the key the cache uses is never reused
    cache = running_stack.data_dir / "cache"
    new_file = cache / record["_id"] / record["versions"][-1]["version"] / "images" / "a.tif"
    assert _sha(new_file) == _sha(tmp_path / "v2" / "images" / "a.tif")


async def test_overwriting_alices_dataset_with_mallorys_permissions_gives_mallory_nothing(
    alice, mallory, tmp_path
):
    a_server, a_svc = alice
    artifact = await upload_folder(a_server, _folder(tmp_path / "a", seed=5), alias="alice-data3")
    m_server, m_svc = mallory
    rewritten = await _plant(
        m_server, ALICE_WS, "alice-data3", _folder(tmp_path / "m", seed=6), overwrite=True
    )
    assert rewritten["config"]["permissions"].get("mallory") == "*"  # the platform let her
    with pytest.raises(Exception, match="artifact not found"):
        await m_svc.infer(model="tiny", artifact=artifact, image_paths=["images/a.tif"])
    with pytest.raises(Exception, match="artifact not found"):
        await m_svc.start_training(
            artifact=artifact,
            train_images="images/",
            train_annotations="images/",
            model="tiny",
            n_epochs=1,
        )
    # alice is not trained on mallory's files either: she is told to replace it
    with pytest.raises(Exception, match="rewritten by 'mallory'"):
        await a_svc.infer(model="tiny", artifact=artifact, image_paths=["images/a.tif"])


# ---------------------------------------------------------------- finding 3: one message
async def test_someone_elses_session_reads_exactly_like_a_made_up_one(alice, mallory, tmp_path):
    a_server, a_svc = alice
    artifact = await upload_folder(a_server, _folder(tmp_path / "a", seed=7), alias="alice-msg")
    started = await a_svc.start_training(
        artifact=artifact,
        train_images="images/",
        train_annotations="images/",
        model="tiny",
        n_epochs=1,
    )
    sid = started["session_id"]
    await a_svc.stop_training(sid)
    _, m_svc = mallory
    made_up = "20260101-000000-deadbeef"
    for call in (
        lambda s: m_svc.get_training_status(s),
        lambda s: m_svc.stop_training(s),
        lambda s: m_svc.infer(model=s, input_arrays=[_image(0)]),
    ):
        with pytest.raises(Exception) as theirs:
            await call(sid)
        with pytest.raises(Exception) as unknown:
            await call(made_up)
        _same_message(theirs.value, sid, unknown.value, made_up)
    private = f"{ALICE_WS}/alice-msg"
    with pytest.raises(Exception) as theirs:
        await m_svc.infer(model="tiny", artifact=private, image_paths=["images/a.tif"])
    with pytest.raises(Exception) as unknown:
        await m_svc.infer(model="tiny", artifact=f"{ALICE_WS}/nope", image_paths=["images/a.tif"])
    _same_message(theirs.value, private, unknown.value, f"{ALICE_WS}/nope")
    assert (await a_svc.get_training_status(sid))["status_type"] in ("stopped", "failed")


# ---------------------------------------------------------------- findings 2 and 7: listing
async def _service_model(running_stack, collection: str, alias: str, dataset: str) -> None:
    """A model artifact as export_model writes it (by the service's own identity)."""
    from cellpose_finetuning.deploy.serve import SERVICE_USER

    token = running_stack.stack.token(SERVICE_USER, roles=("admin",))
    from hypha_rpc import connect_to_server

    server = await connect_to_server({"server_url": running_stack.server_url, "token": token})
    try:
        am = await server.get_service("public/artifact-manager")
        await am.create(
            parent_id=collection,
            alias=alias,
            type="model",
            manifest={"name": alias, "training_dataset_id": dataset},
            config={"training_dataset_id": dataset},
        )
    finally:
        await server.disconnect()


async def test_alices_private_models_are_listed_to_nobody_else(
    alice, mallory, anonymous, running_stack
):
    a_server, a_svc = alice
    am = await a_server.get_service("public/artifact-manager")
    coll = await am.create(
        type="collection", alias="alice-private-models", manifest={"name": "private"}
    )
    dataset = f"{ALICE_WS}/secret-data"
    await _service_model(running_stack, coll["id"], "alice-secret-model", dataset)
    mine = await a_svc.list_models_by_dataset(dataset_id=dataset, collection=coll["id"])
    assert [m["id"] for m in mine] == [f"{ALICE_WS}/alice-secret-model"]
    for _, svc in (mallory, anonymous):
        with pytest.raises(Exception) as theirs:
            await svc.list_models_by_dataset(dataset_id=dataset, collection=coll["id"])
        with pytest.raises(Exception) as unknown:
            await svc.list_models_by_dataset(dataset_id=dataset, collection=f"{ALICE_WS}/nope")
        _same_message(theirs.value, coll["id"], unknown.value, f"{ALICE_WS}/nope")


async def test_a_fake_model_added_to_the_public_collection_is_not_listed(
    alice, mallory, anonymous, running_stack
):
    collection = f"{running_stack.service_id.split('/')[0]}/colab-annotations"
    dataset = f"{ALICE_WS}/official-data"
    await _service_model(running_stack, collection, "alice-official-v1", dataset)
    m_server, _ = mallory
    am = await m_server.get_service("public/artifact-manager")
    # the collection lets any logged-in user add children ("@": "r+")
    await am.create(
        parent_id=collection,
        alias="alice-official-v2",
        type="model",
        manifest={"name": "alice official v2", "training_dataset_id": dataset},
    )
    _, a_svc = alice
    listed = await a_svc.list_models_by_dataset(dataset_id=dataset, collection=collection)
    assert [m["id"] for m in listed] == [f"{collection.split('/')[0]}/alice-official-v1"]
    # anonymous callers may list what anyone may read, the same way
    _, anon = anonymous
    public = await anon.list_models_by_dataset(dataset_id=dataset, collection=collection)
    assert public == listed


# ---------------------------------------------------------------- finding 5: collections
async def test_a_collection_mallory_created_in_alices_workspace_is_not_used(alice, mallory):
    m_server, m_svc = mallory
    am = await m_server.get_service("public/artifact-manager")
    coll = await am.create(
        workspace=ALICE_WS,
        type="collection",
        alias="looks-like-alices",
        manifest={"name": "alice's models"},
        config={"permissions": {"*": "r", "mallory": "*"}},
    )
    with pytest.raises(Exception, match="collection not found"):
        await m_svc.list_models_by_dataset(dataset_id=f"{ALICE_WS}/x", collection=coll["id"])
    _, a_svc = alice
    with pytest.raises(Exception, match="created or last rewritten by 'mallory'"):
        await a_svc.list_models_by_dataset(dataset_id=f"{ALICE_WS}/x", collection=coll["id"])


# ---------------------------------------------------------------- finding 4 and 9: limits
async def test_resizing_past_the_pixel_limit_and_tiny_inputs_are_refused_by_name(alice, anonymous):
    _, svc = alice
    with pytest.raises(Exception, match=r"diameter: 0\.01 .*more than the limit"):
        await svc.infer(model="tiny", input_arrays=[_image(0)], diameter=0.01)
    with pytest.raises(Exception, match=r"input_arrays\[0\]: .*at least"):
        await svc.infer(model="tiny", input_arrays=[np.ones((1, 1), "uint8")])
    with pytest.raises(Exception, match=r"image_paths\[0\]: .*longer than"):
        await svc.infer(model="tiny", artifact=f"{ALICE_WS}/x", image_paths=["a" * 5000])
    _, anon = anonymous
    with pytest.raises(Exception, match=r"diameter: 0\.01"):
        await anon.infer(input_arrays=[_image(0)], diameter=0.01)
    ok = await svc.infer(model="tiny", input_arrays=[_image(0)], diameter=30)
    assert ok[0]["output"].shape == (64, 64)


async def test_errors_and_statuses_name_no_server_path(alice, running_stack, tmp_path):
    server, svc = alice
    folder = tmp_path / "bad"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "broken.tif").write_bytes(b"II*\x00not a tiff at all")
    artifact = await upload_folder(server, folder, alias="broken-data")
    with pytest.raises(Exception) as err:
        await svc.infer(model="tiny", artifact=artifact, image_paths=["images/broken.tif"])
    text = str(err.value).strip().splitlines()[-1]
    assert "images/broken.tif" in text
    assert str(running_stack.data_dir) not in str(err.value)
    assert not re.search(r"/(tmp|home|root)/", text)
    started = await svc.start_training(
        artifact=artifact,
        train_images="images/",
        train_annotations="images/",
        model="tiny",
        n_epochs=1,
    )
    status, _ = await follow_status(svc, started["session_id"])
    assert status["status_type"] == "failed"
    assert str(running_stack.data_dir) not in status["message"], status["message"]


# ---------------------------------------------------------------- finding 8: the data dir
async def test_nothing_in_the_data_dir_is_readable_by_other_local_users(alice, running_stack):
    _, svc = alice
    await svc.infer(model="tiny", input_arrays=[_image(0)])  # the service has written
    root = running_stack.data_dir
    assert root.stat().st_mode & 0o777 == 0o700
    seen = {"cache": 0, "sessions": 0, "s3": 0, "hypha": 0}
    open_files = []
    for path in root.rglob("*"):
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:  # a server removed it meanwhile
            continue
        if stat.S_ISLNK(mode):
            continue
        top = path.relative_to(root).parts[0]
        if top in seen:
            seen[top] += 1
        if stat.S_ISDIR(mode):
            assert mode & 0o077 == 0, f"folder {path} is {oct(mode)}"
        elif mode & 0o077:
            open_files.append(path.relative_to(root))
    assert all(seen.values()), seen  # datasets, sessions, S3 volumes and the database checked
    # SeaweedFS creates its volume files 0644 whatever the umask; they sit in 0700
    # folders (asserted above), so no other local user can reach them either.
    assert [p for p in open_files if p.parts[0] != "s3"] == []
