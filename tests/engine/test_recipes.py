"""Recipes, epoch sampling and the warnings for runs that cannot change their model."""

from __future__ import annotations

import numpy as np
import pytest

from cellpose_finetuning.engine.models import PRESETS
from cellpose_finetuning.engine.recipes import RECIPES, apply_recipe, settings_warnings
from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.engine.training import epoch_order
from cellpose_finetuning.errors import InvalidInput


def test_permutation_sampling_uses_every_image_once_per_pass():
    np.random.seed(3)
    order = epoch_order(5, 13)
    assert len(order) == 13
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))
    assert np.bincount(order, minlength=5).min() >= 2


def test_without_nimg_per_epoch_both_samplings_are_one_permutation():
    for sampling in ("permutation", "cellpose"):
        np.random.seed(1)
        order = epoch_order(5, None, sampling)
        np.random.seed(1)
        assert list(order) == list(np.random.permutation(5))


def test_cellpose_sampling_draws_with_replacement():
    np.random.seed(0)
    order = epoch_order(3, 40, "cellpose")
    assert len(order) == 40 and set(order) == {0, 1, 2}
    assert np.bincount(order).max() > 14  # not balanced passes: draws


def test_an_explicit_value_wins_over_the_recipe_and_contract_defaults_do_not():
    values = apply_recipe({"learning_rate": 1e-6, "batch_size": 4}, "from-scratch")
    assert values["learning_rate"] == RECIPES["from-scratch"].settings["learning_rate"]
    assert values["batch_size"] == 4
    assert values["recipe"] == "from-scratch"
    settings = TrainingSettings.model_validate(values)
    assert settings.nimg_per_epoch == 16 and settings.weight_decay == 0.1


def test_cellpose_recipe_is_cellposes_fine_tuning():
    s = TrainingSettings.model_validate(apply_recipe({}, "cellpose"))
    assert (s.learning_rate, s.weight_decay, s.n_epochs, s.batch_size) == (1e-5, 0.1, 100, 1)
    assert (s.lr_schedule, s.sampling, s.min_train_masks) == ("cellpose", "cellpose", 5)


def test_unknown_recipe_is_named():
    with pytest.raises(InvalidInput, match="recipe"):
        apply_recipe({}, "fast")


def test_a_from_scratch_network_at_the_contracts_rate_is_warned():
    warnings = settings_warnings(TrainingSettings(), arch=PRESETS["tiny"], n_train=5)
    assert any("from-scratch" in w for w in warnings)
    ok = TrainingSettings.model_validate(apply_recipe({}, "from-scratch"))
    assert settings_warnings(ok, arch=PRESETS["tiny"], n_train=5) == []


def test_cpsam_warnings_depend_on_the_total_update():
    contract = TrainingSettings()
    assert any(
        "hardly change" in w for w in settings_warnings(contract, arch=PRESETS["cpsam"], n_train=5)
    )
    cellpose = TrainingSettings.model_validate(apply_recipe({}, "cellpose"))
    assert settings_warnings(cellpose, arch=PRESETS["cpsam"], n_train=5) == []
    short = TrainingSettings(lr_schedule="cellpose", n_epochs=3, learning_rate=1e-5)
    assert any("warms up from 0" in w for w in settings_warnings(short, arch=PRESETS["cpsam"]))
