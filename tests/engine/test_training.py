"""The training runner: cellpose's training, watched, stopped, continued."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from cellpose_finetuning.engine.runs import create_local_session
from cellpose_finetuning.engine.sessions import Session
from cellpose_finetuning.engine.training import (
    continue_session,
    fixed_tile_loss,
    lr_schedule,
    run_training,
    start_worker,
    validation_epochs,
)
from cellpose_finetuning.errors import InvalidInput
from tests.helpers import wait_until


def _session(tmp_path: Path, train, test=(), **settings) -> Session:
    return create_local_session(
        out=tmp_path / "run", train_pairs=train, test_pairs=test, settings=settings
    )


# ----------------------------------------------------------------------------- schedule
def test_cellpose_schedule_is_train_segs_warmup_from_zero():
    lr = lr_schedule(10, 1e-6, kind="cellpose")
    assert lr[0] == 0.0
    np.testing.assert_allclose(lr, np.linspace(0, 1e-6, 10))


def test_proportional_schedule_trains_from_the_first_epoch_of_a_short_run():
    lr = lr_schedule(10, 1e-6)
    assert lr[0] == pytest.approx(1e-6)  # 10-epoch run: 1 warm-up epoch, already at full rate
    assert np.all(lr > 0)


def test_proportional_schedule_warms_up_over_ten_percent_of_a_long_run():
    lr = lr_schedule(100, 1e-5)
    np.testing.assert_allclose(lr[:10], 1e-5 * np.arange(1, 11) / 10)
    assert lr[-1] < lr[49]  # cellpose's end-of-run halvings are kept


def test_validation_epochs_are_first_every_interval_and_last():
    assert validation_epochs(25, 10) == {0, 9, 19, 24}
    assert validation_epochs(3, 1) == {0, 1, 2}


# ----------------------------------------------------------------------------- faithfulness
def test_runner_reproduces_cellpose_train_seg_losses(tmp_path, tiny_model, train_pairs, test_pairs):
    """Same data, seed, schedule and weights: the same losses as cellpose.train.train_seg."""
    import tifffile
    from cellpose import train

    from cellpose_finetuning.engine.models import load_network

    session = _session(
        tmp_path,
        train_pairs,
        test_pairs,
        model=str(tiny_model),
        n_epochs=3,
        learning_rate=1e-3,
        lr_schedule="cellpose",
        validation_interval=1,
    )
    ours = run_training(session)

    net, _ = load_network(tiny_model)
    imgs = [tifffile.imread(a).astype("float32") for a, _ in train_pairs]
    lbls = [tifffile.imread(b) for _, b in train_pairs]
    timgs = [tifffile.imread(a).astype("float32") for a, _ in test_pairs]
    tlbls = [tifffile.imread(b) for _, b in test_pairs]
    (tmp_path / "direct").mkdir()
    torch.manual_seed(0)
    _, train_losses, test_losses = train.train_seg(
        net,
        train_data=imgs,
        train_labels=lbls,
        test_data=timgs,
        test_labels=tlbls,
        n_epochs=3,
        learning_rate=1e-3,
        weight_decay=1e-4,
        save_path=tmp_path / "direct",
        min_train_masks=1,
    )
    np.testing.assert_allclose(ours.train_losses, train_losses, rtol=1e-5)
    assert ours.test_losses[0] == pytest.approx(test_losses[0], rel=1e-5)


def test_nimg_per_epoch_with_cellpose_sampling_takes_train_segs_batches(
    tmp_path, tiny_model, train_pairs
):
    """nimg_per_epoch=7 of 5 images in batches of 2: the same draws, so the same losses."""
    import tifffile
    from cellpose import train

    from cellpose_finetuning.engine.models import load_network

    settings = dict(n_epochs=3, learning_rate=1e-3, batch_size=2, lr_schedule="cellpose")
    session = _session(
        tmp_path,
        train_pairs,
        model=str(tiny_model),
        nimg_per_epoch=7,
        sampling="cellpose",
        **settings,
    )
    ours = run_training(session)

    net, _ = load_network(tiny_model)
    (tmp_path / "direct").mkdir()
    torch.manual_seed(0)
    _, train_losses, _ = train.train_seg(
        net,
        train_data=[tifffile.imread(a).astype("float32") for a, _ in train_pairs],
        train_labels=[tifffile.imread(b) for _, b in train_pairs],
        n_epochs=3,
        learning_rate=1e-3,
        weight_decay=1e-4,
        batch_size=2,
        nimg_per_epoch=7,
        save_path=tmp_path / "direct",
        min_train_masks=1,
    )
    np.testing.assert_allclose(ours.train_losses, train_losses, rtol=1e-5)
    assert len(set(np.round(train_losses, 6))) == 3


# ----------------------------------------------------------------------------- a full run
@pytest.fixture(scope="module")
def completed_run(tmp_path_factory, tiny_model, train_pairs, test_pairs):
    tmp = tmp_path_factory.mktemp("completed")
    session = _session(
        tmp,
        train_pairs,
        test_pairs,
        model=str(tiny_model),
        n_epochs=4,
        learning_rate=1e-3,
        weight_decay=1e-4,
        validation_interval=1,
    )
    worker = start_worker(session, num_threads=2)
    status = worker.wait(timeout=300)
    return session, status


def test_worker_run_completes_with_every_contract_field(completed_run):
    session, status = completed_run
    assert status.status_type == "completed", status.message
    assert status.current_epoch == status.total_epochs == 4
    assert len(status.train_losses) == 4
    assert len(status.test_losses) == 4 and all(x is not None for x in status.test_losses)
    assert len(status.test_metrics) == 4 and all(m is not None for m in status.test_metrics)
    m = status.test_metrics[-1]
    for value in (m.pixel_accuracy, m.precision, m.recall, m.f1, m.iou):
        assert 0.0 <= value <= 1.0
    im = status.instance_metrics
    assert im is not None and im.n_true > 0 and im.n_pred >= 0
    assert status.n_train == 5 and status.n_test == 2
    assert status.start_time and status.elapsed_seconds > 0
    assert status.worker_pid is None


def test_worker_run_lowers_the_loss_and_keeps_checkpoints(completed_run, tiny_model, train_pairs):
    """Loss measured on fixed tiles goes down.

    The per-epoch training loss follows each epoch's random augmentation (five
    images, five steps), so it is not monotonic; validation and
    :func:`fixed_tile_loss` use the same tiles every time.
    """
    session, status = completed_run
    assert status.test_losses[-1] < status.test_losses[0]
    assert fixed_tile_loss(session.weights("last"), train_pairs) < fixed_tile_loss(
        tiny_model, train_pairs
    )
    assert session.weights("last").is_file()
    assert session.weights("best").name == "best.pth"
    assert 1 <= status.best_epoch <= 4


def test_worker_run_draws_training_curves(completed_run):
    session, _ = completed_run
    data = session.curves_file.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_contract_default_run_lowers_the_training_loss(tmp_path, tiny_model, train_pairs):
    """10 epochs at lr 1e-6, wd 1e-4 (the contract's defaults) must learn something.

    With cellpose's 10-epoch warm-up from 0 such a run never reached its rate.
    Compared on the same fixed tiles before and after, the loss must drop.
    """
    session = _session(tmp_path, train_pairs, model=str(tiny_model))
    status = run_training(session)
    assert status.status_type == "completed" and len(status.train_losses) == 10
    before = fixed_tile_loss(tiny_model, train_pairs)
    after = fixed_tile_loss(session.weights("last"), train_pairs)
    assert after < before


def test_one_epoch_of_cellpose_schedule_changes_nothing_but_ours_trains(
    tmp_path, tiny_model, train_pairs
):
    from cellpose_finetuning.engine.models import read_state_dict

    base, _ = read_state_dict(tiny_model)
    changed = {}
    for kind in ("cellpose", "proportional"):
        s = create_local_session(
            out=tmp_path / kind,
            train_pairs=train_pairs,
            settings=dict(model=str(tiny_model), n_epochs=1, lr_schedule=kind, learning_rate=1e-4),
        )
        run_training(s)
        after, _ = read_state_dict(s.weights("last"))
        trainable = [k for k in base if not k.startswith("diam_")]  # diam_* are data stats
        changed[kind] = any(not torch.equal(base[k], after[k]) for k in trainable)
    assert changed == {"cellpose": False, "proportional": True}


# --- stop, continue, crash
def test_stop_ends_within_an_epoch_keeps_weights_and_can_continue(
    tmp_path, tiny_model, train_pairs
):
    session = _session(tmp_path, train_pairs, model=str(tiny_model), n_epochs=500)
    worker = start_worker(session, num_threads=2)
    wait_until(lambda: (session.read_status().current_epoch or 0) >= 1)
    session.request_stop()
    status = worker.wait(timeout=60)
    assert status.status_type == "stopped"
    done = len(status.train_losses)
    assert 1 <= done < 500
    assert session.weights("last").is_file() and session.optimizer_file.is_file()

    continue_session(session, n_epochs=2)
    status = start_worker(session, resume=True, num_threads=2).wait(timeout=120)
    assert status.status_type == "completed", status.message
    assert len(status.train_losses) == done + 2 == status.total_epochs


def test_killed_worker_leaves_a_failed_session_that_can_continue(tmp_path, tiny_model, train_pairs):
    session = _session(
        tmp_path, train_pairs, model=str(tiny_model), n_epochs=500, checkpoint_interval_s=0
    )
    worker = start_worker(session, num_threads=2)
    wait_until(lambda: (session.read_status().current_epoch or 0) >= 2)
    os.kill(worker.pid, signal.SIGKILL)
    status = worker.wait(timeout=30)
    assert status.status_type == "failed"
    assert "ended unexpectedly" in status.message
    assert session.weights("last").is_file()  # checkpoint_interval_s=0 saved every epoch

    done = len(status.train_losses)
    continue_session(session, n_epochs=1)
    status = start_worker(session, resume=True, num_threads=2).wait(timeout=120)
    assert status.status_type == "completed"
    assert len(status.train_losses) == done + 1


# ----------------------------------------------------------------------------- bad input
def test_validation_interval_without_test_data_is_refused(tmp_path, tiny_model, train_pairs):
    with pytest.raises(InvalidInput, match="validation_interval"):
        _session(tmp_path, train_pairs, model=str(tiny_model), validation_interval=1)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("n_epochs", 0), ("n_epochs", -3), ("learning_rate", -1e-5), ("n_samples", 0)],
)
def test_bad_settings_name_the_argument(tmp_path, tiny_model, train_pairs, setting, value):
    with pytest.raises(InvalidInput, match=setting):
        _session(tmp_path, train_pairs, model=str(tiny_model), **{setting: value})


def test_too_few_objects_everywhere_fails_naming_the_annotations(tmp_path, tiny_model, train_pairs):
    session = _session(tmp_path, train_pairs, model=str(tiny_model), min_train_masks=10_000)
    status = start_worker(session).wait(timeout=120)
    assert status.status_type == "failed"
    assert "train_annotations" in status.message and "min_train_masks" in status.message


def test_n_samples_picks_a_reproducible_subset(tmp_path, tiny_model, train_pairs):
    a = create_local_session(
        out=tmp_path / "a",
        train_pairs=train_pairs,
        settings=dict(model=str(tiny_model), n_samples=3, seed=7),
    )
    b = create_local_session(
        out=tmp_path / "b",
        train_pairs=train_pairs,
        settings=dict(model=str(tiny_model), n_samples=3, seed=7),
    )
    assert len(a.data.train) == 3 and a.data.train == b.data.train


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    tmp_path, tiny_model, train_pairs, monkeypatch
):
    """A failed write leaves the last good checkpoint loadable and the session failed."""
    import errno

    from cellpose_finetuning.engine.models import load_network
    from cellpose_finetuning.engine.training import worker_main

    session = _session(
        tmp_path, train_pairs, model=str(tiny_model), n_epochs=5, checkpoint_interval_s=0
    )
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # two epochs saved (weights + optimizer each), then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    worker_main(str(session.path))
    status = session.read_status()
    assert status.status_type == "failed"
    assert "No space left on device" in status.message
    net, _ = load_network(session.weights("last"))  # the epoch-2 checkpoint, intact
    assert net is not None
    assert not list(session.path.glob("weights/.*tmp*"))  # no half-written files left


# ----------------------------------------------------------------------------- tools' formats
def _seg_pairs(pairs, formats_data: Path, split: str):
    return [(img, formats_data / "seg" / split / f"{img.stem}_seg.npy") for img, _ in pairs]


def _losses(tmp_path: Path, name: str, train, test, tiny_model) -> tuple[list, list]:
    session = create_local_session(
        out=tmp_path / name,
        train_pairs=train,
        test_pairs=test,
        settings=dict(
            model=str(tiny_model), n_epochs=1, learning_rate=1e-3, validation_interval=1, seed=3
        ),
    )
    status = run_training(session)
    assert status.status_type == "completed", status.message
    return status.train_losses, status.test_losses


def test_gui_seg_files_train_exactly_as_the_tiff_masks(
    tmp_path, tiny_model, train_pairs, test_pairs, formats_data
):
    """The same seed on a dev image and a test image: the same losses (the whole dev set
    in every format: the slow test below)."""
    train = [train_pairs[2]]
    test = test_pairs[1:]
    tiff = _losses(tmp_path, "tiff", train, test, tiny_model)
    seg = _losses(
        tmp_path,
        "seg",
        _seg_pairs(train, formats_data, "train"),
        _seg_pairs(test, formats_data, "test"),
        tiny_model,
    )
    assert seg == tiff and tiff[0][0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["seg", "png", "geojson", "rois"])
def test_the_whole_dev_set_in_each_format_trains_as_the_tiff_masks(
    tmp_path, tiny_model, train_pairs, test_pairs, formats_data, fmt
):
    ending = {"seg": "_seg.npy", "png": "_cp_masks.png", "geojson": ".geojson", "rois": "_rois.zip"}
    fmt_pairs = {
        split: [(img, formats_data / fmt / split / f"{img.stem}{ending[fmt]}") for img, _ in p]
        for split, p in (("train", train_pairs), ("test", test_pairs))
    }
    tiff = _losses(tmp_path, "tiff", train_pairs, test_pairs, tiny_model)
    other = _losses(tmp_path, fmt, fmt_pairs["train"], fmt_pairs["test"], tiny_model)
    if fmt in ("seg", "png"):
        assert other == tiff
    else:  # rasterised polygons: the same objects up to a few boundary pixels
        np.testing.assert_allclose(other[0], tiff[0], rtol=0.05)
