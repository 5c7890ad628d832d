"""Inference: shapes, dtypes, 3D, and resolving model names."""

from __future__ import annotations

import numpy as np
import pytest

from cellpose_finetuning.engine.inference import (
    ModelCache,
    ModelRef,
    ModelResolver,
    segment,
    to_label_dtype,
)
from cellpose_finetuning.engine.schemas import InferenceSettings, TrainingSettings
from cellpose_finetuning.engine.sessions import DataSpec, SessionStore
from cellpose_finetuning.errors import InvalidInput, NotFound


@pytest.fixture(scope="module")
def model(tiny_model):
    return ModelCache().get(ModelRef("tiny", str(tiny_model), "checkpoint"))


@pytest.mark.parametrize("shape", [(1, 300, 257), (3, 64, 80), (2, 256, 256)])
def test_2d_masks_have_the_image_height_and_width(model, shape):
    image = np.random.default_rng(0).random(shape, dtype="float32")
    masks = segment(model, image)
    assert masks.shape == shape[1:]
    assert masks.dtype == np.uint16


def test_3d_stack_segmented_plane_by_plane_with_stitching(model):
    stack = np.random.default_rng(1).random((4, 1, 64, 64), dtype="float32")
    masks = segment(model, stack, InferenceSettings(stitch_threshold=0.5))
    assert masks.shape == (4, 64, 64)


def test_3d_stack_with_do_3d(model):
    stack = np.random.default_rng(2).random((8, 1, 48, 40), dtype="float32")
    masks = segment(model, stack, InferenceSettings(do_3D=True))
    assert masks.shape == (8, 48, 40)


def test_do_3d_on_a_2d_image_is_refused(model):
    with pytest.raises(InvalidInput, match="do_3D"):
        segment(model, np.zeros((1, 32, 32), "float32"), InferenceSettings(do_3D=True))


def test_wrong_number_of_dimensions_names_the_input(model):
    with pytest.raises(InvalidInput, match="input_arrays\\[3\\]"):
        segment(model, np.zeros((32, 32), "float32"), name="input_arrays[3]")


def test_more_than_65535_objects_become_uint32():
    masks = np.arange(70_000, dtype="int64").reshape(100, 700)
    assert to_label_dtype(masks).dtype == np.uint32
    assert to_label_dtype(masks % 100).dtype == np.uint16


def test_cache_reuses_a_loaded_model(tiny_model):
    cache = ModelCache(max_models=1)
    ref = ModelRef("tiny", str(tiny_model), "checkpoint")
    assert cache.get(ref) is cache.get(ref)
    assert len(cache) == 1


def test_resolver_offers_cpsam_and_checkpoints_by_stem(tmp_path, tiny_model):
    import shutil

    shutil.copy(tiny_model, tmp_path / "nuclei-v1.pth")
    resolver = ModelResolver(models_dir=tmp_path)
    assert resolver.pretrained_names() == ["cpsam", "nuclei-v1"]
    assert resolver.resolve("nuclei-v1").source == str(tmp_path / "nuclei-v1.pth")
    assert resolver.resolve("cpsam").kind == "pretrained"


def test_resolver_hides_other_users_sessions(tmp_path, tiny_model):
    import shutil

    store = SessionStore(tmp_path / "sessions")
    session = store.create(TrainingSettings(), DataSpec(train=[]), owner="alice")
    shutil.copy(tiny_model, session.path / "weights" / "last.pth")
    resolver = ModelResolver(sessions=store)
    assert resolver.resolve(session.id, owner="alice").kind == "session"
    with pytest.raises(NotFound):
        resolver.resolve(session.id, owner="bob")


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs/model.pth", "a/b", ""])
def test_resolver_refuses_paths_from_remote_callers(name):
    with pytest.raises((InvalidInput, NotFound)):
        ModelResolver().resolve(name)
