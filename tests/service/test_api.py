"""The service on the real embedded stack: the contract's Quick Start, datasets, isolation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tifffile

from cellpose_finetuning.client import follow, upload_folder
from tests.helpers import follow_status

pytestmark = pytest.mark.stack

CONTRACT_STATUS_KEYS = {
    "status_type",
    "message",
    "dataset_artifact_id",
    "train_losses",
    "test_losses",
    "test_metrics",
    "instance_metrics",
    "n_train",
    "n_test",
    "start_time",
    "current_epoch",
    "total_epochs",
    "elapsed_seconds",
}


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
async def dataset(alice, dev_data):
    server, _ = alice
    return await upload_folder(server, dev_data, alias="dev-data")


@pytest.fixture(scope="module")
async def trained(alice, dataset):
    """The contract's training call (folder form with a test set) and its polling loop."""
    _, cellpose_service = alice
    session_status = await cellpose_service.start_training(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        test_images="images/test/",
        test_annotations="annotations/test/",
        model="tiny",
        n_epochs=2,
        validation_interval=1,
        learning_rate=1e-3,
    )
    session_id = session_status["session_id"]
    status, history = await follow_status(cellpose_service, session_id)
    return session_id, status, {st["status_type"] for st in history}


async def test_quick_start_infer_on_arrays(alice):
    _, cellpose_service = alice
    img_array = np.random.default_rng(0).integers(0, 255, (3, 96, 128), dtype="uint8")
    result = await cellpose_service.infer(
        model="tiny",
        input_arrays=[img_array],
        diameter=None,
        flow_threshold=0.4,
        cellprob_threshold=0,
        niter=250,
    )
    mask = result[0]["output"]
    assert mask.shape == (96, 128) and mask.dtype in (np.uint16, np.uint32)


async def test_list_pretrained_models_offers_cpsam_and_checkpoints(alice):
    _, svc = alice
    assert await svc.list_pretrained_models() == ["cpsam", "tiny-nuclei", "tiny"]


async def test_training_completes_with_every_documented_status_key(trained):
    session_id, status, seen = trained
    assert status["status_type"] == "completed", status["message"]
    assert set(status) >= CONTRACT_STATUS_KEYS
    assert status["session_id"] == session_id
    assert status["dataset_artifact_id"] == "ws-user-alice/dev-data"
    assert len(status["train_losses"]) == 2 and len(status["test_metrics"]) == 2
    assert all(m and 0 <= m["f1"] <= 1 for m in status["test_metrics"])
    assert set(status["instance_metrics"]) >= {"ap_0_5", "ap_0_75", "ap_0_9", "n_true", "n_pred"}
    assert set(status["base_instance_metrics"]) == set(status["instance_metrics"])
    assert status["n_train"] == 5 and status["n_test"] == 2
    assert "running" in seen or "preparing" in seen


async def test_evaluate_scores_each_model_as_the_run_scored_it(alice, trained, dataset):
    _, svc = alice
    session_id, status, _ = trained
    result = await svc.evaluate(
        models=["tiny", session_id],
        artifact=dataset,
        test_images="images/test/",
        test_annotations="annotations/test/",
    )
    base, tuned = result["report"]["models"]
    assert (base["model"], tuned["model"]) == ("tiny", session_id)
    assert [row["image"] for row in base["images"]] == [
        "images/test/bacteria_t19.tif",
        "images/test/nuclei_03.tif",
    ]
    assert base["metrics"] == status["base_instance_metrics"]
    assert tuned["metrics"] == status["instance_metrics"]
    assert f"| {session_id} |" in result["markdown"]
    for key in ("per_image_ap_png", "overlays_png"):
        assert bytes(result[key]).startswith(b"\x89PNG")


async def test_evaluate_keeps_sessions_private(bob, trained, dataset):
    _, svc = bob
    with pytest.raises(Exception, match="not found"):
        await svc.evaluate(
            models=[trained[0]],
            artifact=dataset,
            test_images="images/test/",
            test_annotations="annotations/test/",
        )


async def test_pattern_form_training(alice, dataset):
    _, svc = alice
    started = await svc.start_training(
        artifact=dataset,
        train_images="images/pattern/*.ome.tif",
        train_annotations="annotations/pattern/*_mask.ome.tif",
        model="tiny",
        n_epochs=1,
    )
    status = await follow(svc, started["session_id"], interval=0.5, show_progress=False)
    assert status["status_type"] == "completed" and status["n_train"] == 5


async def test_infer_with_the_session_from_arrays_and_from_artifact_paths(
    alice, trained, dataset, dev_data
):
    _, svc = alice
    session_id = trained[0]
    image = tifffile.imread(dev_data / "images/test/nuclei_03.tif")
    from_array = await svc.infer(model=session_id, input_arrays=[image])
    from_artifact = await svc.infer(
        model=session_id, artifact=dataset, image_paths=["images/test/nuclei_03.tif"], diameter=40
    )
    assert from_array[0]["output"].shape == image.shape
    assert from_artifact[0]["output"].shape == image.shape


async def test_artifact_url_form_is_accepted(alice, running_stack, dev_data):
    _, svc = alice
    url = f"{running_stack.server_url}/ws-user-alice/artifacts/dev-data"
    result = await svc.infer(model="tiny", artifact=url, image_paths=["images/test/nuclei_03.tif"])
    assert result[0]["output"].shape == (256, 256)


async def test_unmatched_pairs_fail_the_session_naming_the_files(alice, dataset):
    _, svc = alice
    started = await svc.start_training(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/test/",
        model="tiny",
        n_epochs=1,
    )
    status = await follow(svc, started["session_id"], interval=0.3, show_progress=False)
    assert status["status_type"] == "failed"
    assert "nuclei_00.tif" in status["message"]


async def test_bob_sees_nothing_of_alices(alice, bob, trained, dataset):
    _, bob_svc = bob
    session_id = trained[0]
    with pytest.raises(Exception, match="not found"):
        await bob_svc.get_training_status(session_id)
    with pytest.raises(Exception, match="not found"):
        await bob_svc.infer(model=session_id, input_arrays=[np.zeros((32, 32), "uint8")])
    with pytest.raises(Exception, match="not found"):
        await bob_svc.stop_training(session_id)
    with pytest.raises(Exception, match="not found"):
        await bob_svc.restart_training(session_id)
    with pytest.raises(Exception, match="not found"):
        await bob_svc.start_training(
            artifact=dataset, train_images="images/train/", train_annotations="annotations/train/"
        )
    assert await bob_svc.list_training_sessions() == {}
    alice_sessions = await alice[1].list_training_sessions()
    assert alice_sessions[session_id]["session_id"] == session_id


async def test_anonymous_callers_may_only_infer_cpsam_on_arrays(running_stack, dataset):
    server = await running_stack.connect(None)
    try:
        svc = await server.get_service(running_stack.service_id)
        with pytest.raises(Exception, match="logged-in"):
            await svc.start_training(
                artifact=dataset,
                train_images="images/train/",
                train_annotations="annotations/train/",
            )
        with pytest.raises(Exception, match="anonymous"):
            await svc.infer(model="tiny", input_arrays=[np.zeros((32, 32), "uint8")])
        with pytest.raises(Exception, match="logged-in"):
            await svc.list_training_sessions()
    finally:
        await server.disconnect()


async def test_stop_and_continue(alice, dataset, running_stack):
    """Continuing needs no cache: the session keeps its own links to the dataset files."""
    import json
    import shutil
    from pathlib import Path

    _, svc = alice
    started = await svc.start_training(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        model="tiny",
        n_epochs=400,
    )
    sid = started["session_id"]
    await follow_status(svc, sid, done=lambda st: (st.get("current_epoch") or 0) >= 1, interval=0.3)
    await svc.stop_training(sid)
    stopped = await follow(svc, sid, interval=0.3, show_progress=False)
    assert stopped["status_type"] == "stopped"
    done = len(stopped["train_losses"])
    session_dir = running_stack.data_dir / "sessions" / sid
    data = json.loads((session_dir / "data.json").read_text())
    assert data["train"] and all(
        Path(f).is_relative_to(session_dir / "dataset") for pair in data["train"] for f in pair
    )
    for cached in (running_stack.data_dir / "cache").iterdir():  # as if all were evicted
        shutil.rmtree(cached)
    await svc.restart_training(sid, n_epochs=1)
    final = await follow(svc, sid, interval=0.3, show_progress=False)
    assert final["status_type"] == "completed" and len(final["train_losses"]) == done + 1


async def test_browser_style_single_dict_arguments(alice):
    _, svc = alice
    status = await svc.get_training_capabilities()
    assert status["parameters"]["n_epochs"]["default"] == 10
    assert status["parameters"]["learning_rate"]["default"] == 1e-6


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"session_id": "no-such-session"}, "not found"),
        ({"session_id": "../../etc"}, "session_id"),
        ({"session_id": 42}, "session_id"),
    ],
)
async def test_bad_status_requests_are_named_and_the_service_stays_up(alice, kwargs, needle):
    _, svc = alice
    with pytest.raises(Exception, match=needle):
        await svc.get_training_status(**kwargs)
    assert "cpsam" in await svc.list_pretrained_models()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"validation_interval": 1}, "validation_interval"),
        ({"train_images": "../x/"}, "train_images"),
        ({"model": "no-such-model"}, "not found"),
        ({"artifact": "ws-user-alice/missing"}, "not found"),
        ({"test_images": "images/test/"}, "test_annotations"),
    ],
)
async def test_bad_training_requests_are_named(alice, dataset, kwargs, needle):
    _, svc = alice
    args = dict(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        model="tiny",
    )
    args.update(kwargs)
    with pytest.raises(Exception, match=needle):
        await svc.start_training(**args)


async def test_service_id_is_the_contracts(running_stack):
    assert running_stack.service_id == "bioimage-io/cellpose-finetuning"


async def test_2500_files_are_listed_past_the_old_1000_cap(alice, running_stack, tmp_path):
    """1250 image/mask pairs (2500 files) in one folder: all are listed and paired."""
    from PIL import Image

    server, svc = alice
    root = tmp_path / "many"
    (root / "img").mkdir(parents=True)
    (root / "lbl").mkdir()
    rng = np.random.default_rng(0)
    mask = np.zeros((24, 24), "uint8")
    mask[4:12, 4:12], mask[14:20, 10:22] = 1, 2
    for i in range(1250):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype="uint8")).save(
            root / "img" / f"f{i:04d}.png"
        )
        Image.fromarray(mask).save(root / "lbl" / f"f{i:04d}_mask.png")
    artifact = await upload_folder(server, root, alias="many-files")
    started = await svc.start_training(
        artifact=artifact,
        train_images="img/*.png",
        train_annotations="lbl/*_mask.png",
        model="tiny",
        n_epochs=1,
        n_samples=3,
        min_train_masks=1,  # two objects per mask; the original's default is 5
    )
    status = await follow(svc, started["session_id"], interval=0.5, show_progress=False)
    assert status["status_type"] == "completed", status["message"]
    assert status["n_train"] == 3
    import json

    data = json.loads(
        (running_stack.data_dir / "sessions" / started["session_id"] / "data.json").read_text()
    )
    assert data["source"]["n_files_listed"] == 2500
    assert data["source"]["n_available"] == 1250  # pairs, as the CLI records it


async def test_remote_cli_uploads_trains_and_infers(running_stack, dev_data, tmp_path):
    """The CLI's remote commands drive the service through the client helper."""
    import json

    from click.testing import CliRunner

    from cellpose_finetuning.cli import main

    base = [
        "remote",
        "--server-url",
        running_stack.server_url,
        "--token",
        running_stack.token("dora"),
        "--service-id",
        running_stack.service_id,
    ]

    def run(*args):
        result = CliRunner().invoke(main, [*base, *args], catch_exceptions=False)
        return result.exit_code, result.output

    code, out = await asyncio.to_thread(run, "upload", str(dev_data), "--alias", "cli-data")
    assert code == 0, out
    import re

    artifact = re.search(r"ws-user-dora/[\w.-]+", out).group(0)  # the bar shares the output
    assert artifact == "ws-user-dora/cli-data"
    code, out = await asyncio.to_thread(
        run,
        "train",
        "--artifact",
        artifact,
        "--train-images",
        "images/train/",
        "--train-annotations",
        "annotations/train/",
        "--model",
        "tiny",
        "--n-epochs",
        "1",
        "--json",
    )
    assert code == 0, out
    status = json.loads(out[out.index("{") :])
    assert status["status_type"] == "completed"
    code, out = await asyncio.to_thread(
        run,
        "infer",
        "--model",
        status["session_id"],
        str(dev_data / "images/test/nuclei_03.tif"),
        "--out",
        str(tmp_path),
    )
    assert code == 0, out
    assert tifffile.imread(tmp_path / "nuclei_03_masks.tif").shape == (256, 256)
    code, out = await asyncio.to_thread(run, "status", "no-such-session")
    assert code != 0 and "not found" in out


async def test_positional_dict_arguments_work_like_keywords(alice, trained):
    _, svc = alice
    status = await svc.get_training_status({"session_id": trained[0]})
    assert status["session_id"] == trained[0]
