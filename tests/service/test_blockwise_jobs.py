"""Block-wise ``infer`` on an artifact image as a job (#22): poll, labels for the caller only."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
import tifffile

from cellpose_finetuning.client import upload_folder
from cellpose_finetuning.engine.blockwise import segment_blockwise
from cellpose_finetuning.engine.inference import ModelCache, ModelRef

pytestmark = pytest.mark.stack

BLOCK = 128


@pytest.fixture(scope="module")
async def alice(running_stack):
    server = await running_stack.connect("alice")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
async def bob(running_stack):
    server = await running_stack.connect("bob")
    yield server, await server.get_service(running_stack.service_id)
    await server.disconnect()


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory, dev_data):
    """The dev nuclei mirrored to 384², a uint16 TIFF: 9 blocks of 128²."""
    img = tifffile.imread(dev_data / "images" / "test" / "nuclei_03.tif").astype("float32")
    quad = np.block([[img, img[:, ::-1]], [img[::-1, :], img[::-1, ::-1]]])[:384, :384]
    folder = tmp_path_factory.mktemp("slide-data")
    tifffile.imwrite(folder / "slide.tif", (quad / quad.max() * 60000).astype("uint16"))
    return folder


async def _poll(svc, job_id: str, timeout: float = 300.0) -> tuple[dict, list[dict]]:
    """Poll until the job ends (bounded); every status seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await svc.get_inference_status(job_id)
        seen.append(status)
        if status["status"] in ("completed", "failed"):
            return status, seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} not done in {timeout} s: {seen[-1]}")


async def test_blockwise_infer_job_gives_the_engines_labels_to_its_caller_only(
    alice, bob, slide_dir, learned_tiny
):
    server, svc = alice
    dataset = await upload_folder(server, slide_dir, alias="slide-data")
    answer = await svc.infer(
        model="tiny-nuclei", artifact=dataset, image_paths=["slide.tif"], block_size=BLOCK
    )
    (item,) = answer
    assert item["input_path"] == "slide.tif" and "output" not in item
    status, seen = await _poll(svc, item["job_id"])
    assert status["status"] == "completed", status
    assert status["blocks_done"] == status["blocks_total"] == 2 * 9  # two passes
    assert status["block_size"] == BLOCK and status["shape"] == [384, 384]
    assert all(s["blocks_done"] <= s["blocks_total"] for s in seen if s["blocks_total"])

    # The labels are the engine's, in an artifact the caller reads with her own connection.
    expected = segment_blockwise(
        ModelCache().get(ModelRef("nuclei", str(learned_tiny), "checkpoint")),
        slide_dir / "slide.tif",
        block_size=BLOCK,
    ).masks
    assert expected.max() > 20
    assert status["n_objects"] == int(expected.max())
    am = await server.get_service("public/artifact-manager")
    url = await am.get_file(status["artifact_id"], file_path=status["file"])
    async with httpx.AsyncClient() as client:
        for link in (url, status["download_url"]):
            resp = await client.get(link)
            assert resp.status_code == 200
            np.testing.assert_array_equal(tifffile.imread(io.BytesIO(resp.content)), expected)

    # A stranger can neither poll the job nor read its labels; the error is an unknown id's.
    bob_server, bob_svc = bob
    with pytest.raises(Exception, match="inference job not found") as theirs:
        await bob_svc.get_inference_status(item["job_id"])
    with pytest.raises(Exception, match="inference job not found") as unknown:
        await svc.get_inference_status("0" * 32)
    assert str(theirs.value).replace(item["job_id"], "0" * 32) == str(unknown.value)
    bob_am = await bob_server.get_service("public/artifact-manager")
    with pytest.raises(Exception, match="(?i)permission|denied|not allowed|forbidden"):
        await bob_am.get_file(status["artifact_id"], file_path=status["file"])


async def test_block_size_with_a_diameter_is_refused_by_name(alice, slide_dir):
    server, svc = alice
    dataset = await upload_folder(server, slide_dir, alias="slide-data-2")
    with pytest.raises(Exception, match="block_size.*diameter"):
        await svc.infer(
            model="tiny-nuclei", artifact=dataset, image_paths=["slide.tif"], block_size=BLOCK,
            diameter=17.0,
        )  # fmt: skip


def _service():
    """The service ``serve`` runs in this process for the test session."""
    import gc

    from cellpose_finetuning.service.api import CellposeService

    found = [o for o in gc.get_objects() if isinstance(o, CellposeService)]
    services = [s for s in found if s.artifacts is not None and s.owners.service_user]
    assert len(services) == 1
    return services[0]


async def test_expired_results_are_deleted_but_only_the_services_own(alice, slide_dir):
    from cellpose_finetuning.service.jobs import RESULT_PREFIX, delete_expired_results

    server, svc = alice
    dataset = await upload_folder(server, slide_dir, alias="slide-data-expiry")
    (item,) = await svc.infer(
        model="tiny-nuclei", artifact=dataset, image_paths=["slide.tif"], block_size=BLOCK
    )
    status, _ = await _poll(svc, item["job_id"])
    assert status["status"] == "completed", status
    result = status["artifact_id"]
    assert result.split("/")[1] == RESULT_PREFIX + item["job_id"]
    # alice plants an artifact with a result's alias in the service's workspace
    am = await server.get_service("public/artifact-manager")
    planted = await am.create(
        workspace=result.split("/")[0],
        alias=f"{RESULT_PREFIX}planted-by-alice",
        type="generic",
        manifest={"name": "planted"},
    )
    service = _service()
    own_am, user = service.artifacts.am, service.owners.service_user
    hour = 3600.0
    young = await delete_expired_results(own_am, service_user=user, ttl_s=hour)
    assert result not in young and planted["id"] not in young
    later = time.time() + 2 * hour
    old = await delete_expired_results(own_am, service_user=user, ttl_s=hour, now=later)
    assert result in old and planted["id"] not in old
    with pytest.raises(Exception, match="(?i)not exist|not found"):
        await own_am.read(result)
    assert (await am.read(planted["id"]))["id"] == planted["id"]
    await am.delete(planted["id"], delete_files=True)
    assert not (service.config.data_dir / "jobs" / item["job_id"]).exists()
