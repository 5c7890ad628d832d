"""What the commands share: options generated from the settings models, errors, exit codes.

Every option that sets a field of :class:`~cellpose_finetuning.engine.schemas.TrainingSettings`
or :class:`~cellpose_finetuning.engine.schemas.InferenceSettings` is made by
:func:`settings_option` from the field itself: its default, its bounds (a
``click.IntRange``/``click.FloatRange``), its choices (a ``Literal``) and its
help. A command that deliberately differs says so in the call (``default=None``
where the recipe decides, for instance); ``tests/cli/test_settings_options.py``
holds the list of those differences.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click
from pydantic import BaseModel

from cellpose_finetuning.engine.schemas import TrainingSettings
from cellpose_finetuning.errors import CellposeFinetuningError
from cellpose_finetuning.names import DEFAULT_DATA_DIR

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
EXIT_FAILED = 1

#: Formats of ``--save`` (io.annotations.OUTPUT_FORMATS; not imported: it loads tifffile & co).
SAVE_FORMATS = ("tif", "seg", "png", "rois", "geojson")


def friendly_errors(func: F) -> F:
    """Turn our typed errors (and a few common ones) into one-line messages."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = click.get_current_context().find_root().params.get("verbose", False)
        try:
            return func(*args, **kwargs)
        except (CellposeFinetuningError, FileNotFoundError, ValueError) as exc:
            if verbose:
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------- settings options
#: annotated_types' bound attributes: (attribute, side, open).
_BOUNDS = (("gt", "min", True), ("ge", "min", False), ("lt", "max", True), ("le", "max", False))


def field_bounds(model: type[BaseModel], field: str) -> dict[str, Any]:
    """A field's bounds as ``click.IntRange``/``FloatRange`` arguments (empty: unbounded).

    >>> from cellpose_finetuning.engine.schemas import TrainingSettings
    >>> field_bounds(TrainingSettings, "learning_rate")
    {'min': 0, 'min_open': True, 'max': 1.0, 'max_open': False}
    """
    bounds: dict[str, Any] = {}
    for item in model.model_fields[field].metadata:  # annotated_types' Gt, Ge, Lt, Le
        for attr, side, is_open in _BOUNDS:
            if getattr(item, attr, None) is not None:
                bounds[side] = getattr(item, attr)
                bounds[f"{side}_open"] = is_open
    return bounds


def field_type(model: type[BaseModel], field: str) -> Any:
    """The field's annotation without ``None``: a class, or a ``Literal[...]``."""
    annotation = model.model_fields[field].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else Union[tuple(kinds)]  # noqa: UP007
    return annotation


def _click_type(model: type[BaseModel], field: str, kind: Any) -> Any:
    if get_origin(kind) is Literal:
        return click.Choice([str(choice) for choice in get_args(kind)])
    bounds = field_bounds(model, field)
    if kind is int:
        return click.IntRange(**bounds) if bounds else int
    if kind is float:
        return click.FloatRange(**bounds) if bounds else float
    if kind is str:
        return str
    raise TypeError(f"{model.__name__}.{field} ({kind}) needs an explicit type=")


def settings_option(
    model: type[BaseModel], field: str, *flags: str, **overrides: Any
) -> Callable[[F], F]:
    """A click option for ``model.field``: its default, bounds, choices and help.

    Parameters
    ----------
    model : pydantic model class
        ``TrainingSettings`` or ``InferenceSettings``.
    field : str
        The field; also the name of the command's parameter (``name=`` to change it).
    *flags : str
        The option's flags (default: ``--field-name``).
    **overrides
        Where the command deliberately differs from the model: ``default``
        (e.g. ``None`` where the recipe or the session decides), ``help``,
        ``type`` (a Python type gets the field's bounds), ``name``, or any
        other ``click.option`` argument.

    Returns
    -------
    callable
        The decorator; the option remembers ``(model, field)`` as ``settings_field``.
    """
    info = model.model_fields[field]
    name = overrides.pop("name", field)
    flags = flags or (f"--{field.replace('_', '-')}",)
    kind = overrides.pop("type", None) or field_type(model, field)
    default = overrides.pop("default", info.default)
    kwargs: dict[str, Any] = {"default": default, "help": info.description}
    if kind is bool:
        kwargs["is_flag"] = True
        if default is True:  # a flag that is on by default is turned off with --no-...
            flags = tuple(f"{flag}/--no-{flag.removeprefix('--')}" for flag in flags)
    else:
        kwargs["type"] = (
            kind if isinstance(kind, click.ParamType) else _click_type(model, field, kind)
        )
        kwargs["show_default"] = default is not None
    kwargs.update(overrides)

    def decorator(func: F) -> F:
        func = click.option(*flags, name, **kwargs)(func)
        func.__click_params__[-1].settings_field = (model, field)  # type: ignore[attr-defined]
        return func

    return decorator


def recipe_options(func: F) -> F:
    """``--recipe``, ``--nimg-per-epoch`` and ``--sampling`` (``train`` and ``remote train``)."""
    from cellpose_finetuning.engine.recipes import RECIPES

    func = settings_option(
        TrainingSettings,
        "sampling",
        default=None,  # the recipe decides, else the model's 'permutation'
        help="How an epoch picks images: 'permutation' (default: each image once per pass) "
        "or 'cellpose' (train_seg's draws with replacement when --nimg-per-epoch differs "
        "from the number of images).",
    )(func)
    func = settings_option(TrainingSettings, "nimg_per_epoch")(func)
    return settings_option(
        TrainingSettings,
        "recipe",
        help="Named settings; options you give explicitly win. "
        + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
    )(func)


def data_dir_option(func: F) -> F:
    """``--data-dir`` of the embedded stack (``serve``, ``token``, ``health``)."""
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help="Where the stack keeps S3 data, the database, sessions and models.",
    )(func)


def save_option(help: str) -> Callable[[F], F]:
    """``--save``: output formats, repeatable (``infer``, ``remote infer``)."""
    return click.option(
        "--save",
        "save",
        multiple=True,
        type=click.Choice([*SAVE_FORMATS, "all"]),
        default=("tif",),
        show_default=True,
        help=help,
    )


def save_formats(save: tuple[str, ...]) -> list[str]:
    """The formats of ``--save`` in order, ``all`` expanded."""
    return list(SAVE_FORMATS) if "all" in save else list(dict.fromkeys(save))
