"""Named training recipes, and warnings for runs that cannot change their model.

A recipe is a set of training settings chosen for one situation:

``contract``
    The original service's defaults (10 epochs, learning rate 1e-6, weight
    decay 1e-4, batch 1): a gentle nudge of ``cpsam``. Still what a call
    without ``recipe`` gets, so old clients see no change.
``cellpose``
    cellpose's documented fine-tuning of ``cpsam`` (``train_seg`` with
    learning rate 1e-5, weight decay 0.1, 100 epochs, batch 1, its own
    warm-up schedule and sampling, ``min_train_masks=5``).
``from-scratch``
    What the untrained ``tiny``/``small`` networks need to learn anything
    on a CPU: learning rate 3e-3, weight decay 0.1, 60 epochs of 16 tiles
    in batches of 4 (the demo's run).

Values the caller gives explicitly win over the recipe; a value equal to
the contract's default counts as not given (the service's method signature
always passes the contract's defaults).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from cellpose_finetuning.engine.schemas import TRAINING_DEFAULTS, TrainingSettings
from cellpose_finetuning.errors import InvalidInput

__all__ = [
    "CONTRACT_DEFAULTS",
    "RECIPES",
    "Recipe",
    "apply_recipe",
    "model_architecture",
    "settings_warnings",
]


class Recipe(BaseModel):
    """A named set of training settings."""

    name: str
    description: str
    settings: dict[str, Any]


#: The contract's defaults of ``start_training`` (and of the CLI's ``train``).
CONTRACT_DEFAULTS: dict[str, Any] = {
    key: TRAINING_DEFAULTS[key]
    for key in (
        "n_epochs",
        "learning_rate",
        "weight_decay",
        "batch_size",
        "min_train_masks",
        "lr_schedule",
        "sampling",
    )
}

RECIPES: dict[str, Recipe] = {
    "contract": Recipe(
        name="contract",
        description="The original service's defaults: a gentle nudge of cpsam with very few "
        "images (10 epochs at learning rate 1e-6).",
        settings=dict(CONTRACT_DEFAULTS),
    ),
    "cellpose": Recipe(
        name="cellpose",
        description="cellpose's documented fine-tuning of cpsam: learning rate 1e-5, weight "
        "decay 0.1, 100 epochs, batch 1, cellpose's warm-up and sampling, images with fewer "
        "than 5 objects dropped.",
        settings={
            "n_epochs": 100,
            "learning_rate": 1e-5,
            "weight_decay": 0.1,
            "batch_size": 1,
            "min_train_masks": 5,
            "lr_schedule": "cellpose",
            "sampling": "cellpose",
        },
    ),
    "from-scratch": Recipe(
        name="from-scratch",
        description="For the untrained tiny/small networks: learning rate 3e-3, weight decay "
        "0.1, 60 epochs of 16 tiles in batches of 4 (960 tiles; minutes on a CPU).",
        settings={
            "n_epochs": 60,
            "learning_rate": 3e-3,
            "weight_decay": 0.1,
            "batch_size": 4,
            "nimg_per_epoch": 16,
            "min_train_masks": 1,
            "lr_schedule": "proportional",
            "sampling": "permutation",
        },
    ),
}


def apply_recipe(
    values: Mapping[str, Any],
    recipe: str | None = None,
    *,
    defaults: Mapping[str, Any] | None = CONTRACT_DEFAULTS,
) -> dict[str, Any]:
    """Fill loose training settings from a recipe.

    Parameters
    ----------
    values : mapping
        Settings as given (``None`` means not given). ``values["recipe"]`` is
        used when ``recipe`` is not passed.
    recipe : str, optional
        A name in :data:`RECIPES`.
    defaults : mapping, optional
        Values that count as "not given" (an edge whose signature has
        defaults cannot tell them from explicit ones). ``None``: only
        missing or ``None`` values are filled.

    Returns
    -------
    dict
        The settings with the recipe's values filled in and ``recipe`` set.
    """
    out = dict(values)
    recipe = recipe if recipe is not None else out.get("recipe")
    if recipe is None:
        return out
    if recipe not in RECIPES:
        raise InvalidInput("recipe", f"unknown recipe {recipe!r}; use one of {list(RECIPES)}")
    for key, value in RECIPES[recipe].settings.items():
        given = out.get(key)
        if given is None or (defaults is not None and key in defaults and given == defaults[key]):
            out[key] = value
    out["recipe"] = recipe
    return out


def model_architecture(model: str | os.PathLike[str]) -> Any:
    """The architecture of ``cpsam`` or a checkpoint file, read without loading the weights."""
    import torch

    from cellpose_finetuning.engine.models import ARCH_KEY, PRESETS, PRETRAINED_MODELS

    name = os.fspath(model)
    if name in PRETRAINED_MODELS:
        return PRESETS["cpsam"]
    try:
        state = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(state, dict):
        return None
    tensor = state.get(ARCH_KEY)
    if tensor is None:
        return PRESETS["cpsam"]
    from cellpose_finetuning.engine.models import ArchSpec

    return ArchSpec.model_validate_json(bytes(tensor.tolist()).decode())


def settings_warnings(
    settings: TrainingSettings, *, arch: Any = None, n_train: int | None = None
) -> list[str]:
    """Reasons to believe a run cannot change its model, in plain words.

    Parameters
    ----------
    settings : TrainingSettings
        The run's settings.
    arch : ArchSpec, optional
        The starting network's architecture (see :func:`model_architecture`).
    n_train : int, optional
        Training images; with it the total number of optimizer steps is checked.

    Returns
    -------
    list of str
        Empty when nothing looks wrong.
    """
    from cellpose_finetuning.engine.schedules import lr_schedule

    out = []
    lr = settings.learning_rate
    small = arch is not None and not arch.is_cpsam
    if small and lr < 1e-4:
        out.append(
            f"the {arch.name!r} network is not pretrained; at learning rate {lr:g} its weights "
            "barely move and it will not learn to segment. Use recipe 'from-scratch' "
            "(learning rate 3e-3, weight decay 0.1, batch 8)."
        )
    if settings.lr_schedule == "cellpose" and settings.n_epochs <= 10:
        out.append(
            f"lr_schedule 'cellpose' warms up from 0 over 10 epochs: a {settings.n_epochs}-epoch "
            "run never trains at its learning rate (epoch 1 does not train at all)."
        )
    if n_train:
        per_epoch = settings.nimg_per_epoch or n_train
        steps = math.ceil(per_epoch / settings.batch_size)
        schedule = lr_schedule(
            settings.n_epochs, lr, kind=settings.lr_schedule, warmup=settings.warmup_epochs
        )
        travel = float(schedule.sum()) * steps  # upper bound of any weight's total change
        if travel < 1e-4 and not small:
            out.append(
                f"{settings.n_epochs} epochs of {steps} step(s) at learning rate {lr:g} move "
                f"each weight by at most ~{travel:.0e} in total: the model will hardly change. "
                "For a real fine-tune use recipe 'cellpose' (or more epochs / a higher rate)."
            )
    return out
