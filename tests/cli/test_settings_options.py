"""Every CLI option that sets a training or inference setting agrees with the settings model.

The commands are introspected as click built them: an option's default, bounds
and choices must be the pydantic field's, except for the differences listed in
``DELIBERATE`` (and nowhere else). Editing a default or a bound on either side,
or adding a hand-written option for a settings field, fails here.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

import click
import pytest
from pydantic import BaseModel, Field

from cellpose_finetuning.cli import main
from cellpose_finetuning.cli.options import settings_option
from cellpose_finetuning.engine.schemas import InferenceSettings, TrainingSettings

_TRAINING = (
    "model",
    "n_epochs",
    "learning_rate",
    "weight_decay",
    "validation_interval",
    "n_samples",
    "batch_size",
    "min_train_masks",
    "seed",
    "device",
    "recipe",
    "nimg_per_epoch",
    "sampling",
)
_REMOTE_TRAINING = (
    "model",
    "n_epochs",
    "learning_rate",
    "weight_decay",
    "validation_interval",
    "n_samples",
    "recipe",
    "nimg_per_epoch",
    "sampling",
)
_INFERENCE = (
    "diameter",
    "flow_threshold",
    "cellprob_threshold",
    "niter",
    "batch_size",
    "do_3D",
    "stitch_threshold",
    "block_size",
    "block_overlap",
)

#: command path -> (settings model, the fields it exposes as options)
EXPOSED: dict[tuple[str, ...], tuple[type[BaseModel], tuple[str, ...]]] = {
    ("train",): (TrainingSettings, _TRAINING),
    ("continue",): (TrainingSettings, ("n_epochs",)),
    ("demo",): (TrainingSettings, ("n_epochs", "seed")),
    ("remote", "train"): (TrainingSettings, _REMOTE_TRAINING),
    ("infer",): (InferenceSettings, _INFERENCE),
    ("evaluate",): (
        InferenceSettings,
        ("diameter", "flow_threshold", "cellprob_threshold", "block_size", "block_overlap"),
    ),
    ("export",): (InferenceSettings, ("flow_threshold", "cellprob_threshold")),
    ("remote", "infer"): (InferenceSettings, ("diameter",)),
}

#: The parameter's name where it is not the field's.
PARAM_NAME = {"do_3D": "do_3d"}

#: Where the CLI deliberately differs from the model: (command, field) -> {what: value}.
DELIBERATE: dict[tuple[tuple[str, ...], str], dict[str, Any]] = {
    # None: the recipe decides, else the model's default applies.
    (("train",), "sampling"): {"default": None},
    (("remote", "train"), "sampling"): {"default": None},
    # None: the session's own n_epochs; the recipe's.
    (("continue",), "n_epochs"): {"default": None},
    (("demo",), "n_epochs"): {"default": None},
    # The CLI takes a count; the model (and the service) also take a fraction.
    (("train",), "n_samples"): {"type": int},
    (("remote", "train"), "n_samples"): {"type": int},
}

#: Options named like a settings field that are something else (the command's model differs).
NOT_SETTINGS = {
    ("infer",): {"device"},  # InferenceSettings has no device; the model cache takes it
    ("evaluate",): {"device"},
}


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group), path
        command = command.commands[name]
    return command


def _param(path: tuple[str, ...], field: str) -> click.Parameter:
    name = PARAM_NAME.get(field, field)
    params = {p.name: p for p in _command(path).params}
    assert name in params, f"{' '.join(path)} has no option for {field}"
    return params[name]


def _bounds(model: type[BaseModel], field: str) -> dict[str, Any]:
    """The field's bounds, read from its metadata (independently of the CLI's helper)."""
    out: dict[str, Any] = {}
    for item in model.model_fields[field].metadata:
        kind = type(item).__name__
        if kind in ("Gt", "Ge"):
            out.update(min=getattr(item, kind.lower()), min_open=kind == "Gt")
        elif kind in ("Lt", "Le"):
            out.update(max=getattr(item, kind.lower()), max_open=kind == "Lt")
    return out


def _kind(model: type[BaseModel], field: str) -> Any:
    annotation = model.model_fields[field].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = tuple(a for a in get_args(annotation) if a is not type(None))
        return kinds[0] if len(kinds) == 1 else kinds
    return annotation


CASES = [(path, field) for path, (_, fields) in EXPOSED.items() for field in fields]


@pytest.mark.parametrize(("path", "field"), CASES, ids=[f"{' '.join(p)}:{f}" for p, f in CASES])
def test_option_default_bounds_and_choices_are_the_models(path, field):
    model = EXPOSED[path][0]
    info = model.model_fields[field]
    param = _param(path, field)
    deliberate = DELIBERATE.get((path, field), {})

    assert param.default == deliberate.get("default", info.default)
    kind = deliberate.get("type", _kind(model, field))
    bounds = _bounds(model, field)
    if kind is bool:
        assert param.is_flag and param.type.name == "boolean"
    elif get_origin(kind) is Literal:
        assert isinstance(param.type, click.Choice)
        assert list(param.type.choices) == list(get_args(kind))
    elif kind in (int, float):
        if bounds:
            range_type = click.IntRange if kind is int else click.FloatRange
            assert isinstance(param.type, range_type), param.type
            got = {k: getattr(param.type, k) for k in ("min", "max", "min_open", "max_open")}
            want = {"min": None, "max": None, "min_open": False, "max_open": False, **bounds}
            assert got == want
        else:
            assert param.type is (click.INT if kind is int else click.FLOAT)
    else:
        assert kind is str and param.type is click.STRING, (field, kind)
    assert param.help, f"{field} has no help"


def test_every_option_named_after_a_field_is_listed():
    """A hand-written option for a settings field (e.g. a new --min-size) must be listed."""
    for path, (model, fields) in EXPOSED.items():
        names = {PARAM_NAME.get(f, f) for f in model.model_fields}
        listed = {PARAM_NAME.get(f, f) for f in fields}
        extra = {p.name for p in _command(path).params} & names
        assert extra - listed - NOT_SETTINGS.get(path, set()) == set(), path


def test_deliberate_differences_are_only_those_listed():
    """Each listed difference is still one (a stale entry would hide a change)."""
    for (path, field), what in DELIBERATE.items():
        model = EXPOSED[path][0]
        param = _param(path, field)
        if "default" in what:
            assert model.model_fields[field].default != what["default"]
            assert param.default == what["default"]
        if "type" in what:
            assert _kind(model, field) != what["type"]


class _Toy(BaseModel):
    count: int = Field(3, gt=0, lt=9, description="A count.")
    ratio: float | None = Field(None, ge=0.5, le=1.0, description="A ratio.")
    mode: Literal["a", "b"] = Field("b", description="A mode.")
    flag: bool = Field(True, description="On by default.")


def test_settings_option_follows_an_edited_model():
    """The helper reads the field, so changing the model changes the option."""

    @click.command()
    @settings_option(_Toy, "count")
    @settings_option(_Toy, "ratio", "--ratio", "-r")
    @settings_option(_Toy, "mode")
    @settings_option(_Toy, "flag")
    def toy(**_: Any) -> None: ...

    params = {p.name: p for p in toy.params}
    count, ratio, mode, flag = (params[n] for n in ("count", "ratio", "mode", "flag"))
    assert isinstance(count.type, click.IntRange) and count.default == 3
    assert (count.type.min, count.type.max, count.type.min_open, count.type.max_open) == (
        0,
        9,
        True,
        True,
    )
    assert isinstance(ratio.type, click.FloatRange) and ratio.default is None
    assert (ratio.type.min, ratio.type.max, ratio.type.min_open, ratio.type.max_open) == (
        0.5,
        1.0,
        False,
        False,
    )
    assert ratio.opts == ["--ratio", "-r"] and ratio.help == "A ratio."
    assert list(mode.type.choices) == ["a", "b"] and mode.default == "b"
    assert flag.is_flag and flag.default is True and flag.secondary_opts == ["--no-flag"]
    assert count.settings_field == (_Toy, "count")


def test_an_out_of_bounds_value_is_refused_before_anything_runs(tmp_path):
    from click.testing import CliRunner

    result = CliRunner().invoke(
        main, ["infer", "--model", "cpsam", "x.tif", "--out", str(tmp_path), "--batch-size", "0"]
    )
    assert result.exit_code == 2 and "--batch-size" in result.output
    assert "1<=x<=256" in result.output


#: serve's options -> ServiceConfig's fields, and -> RayOptions' (the service's own limits).
SERVE_SERVICE = {
    "max_concurrent_trainings": "max_concurrent_trainings",
    "max_active_sessions_per_user": "max_active_sessions_per_user",
    "max_epochs": "max_epochs",
    "max_pixels": "max_pixels",
    "max_blockwise_pixels": "max_blockwise_pixels",
    "max_files": "max_files",
    "max_sessions_per_user": "max_sessions_per_user",
    "max_waiting_infers_per_user": "max_waiting_infers_per_user",
    "training_time_slice": "training_time_slice_s",
    "direct_s3_reads": "direct_s3_reads",
    "cache_max_bytes": "cache_max_bytes",
    "job_result_ttl_hours": "job_result_ttl_hours",
}
SERVE_RAY = {
    "ray_address": "address",
    "ray_num_cpus": "num_cpus",
    "ray_num_gpus": "num_gpus",
    "inference_replicas": "inference_replicas",
    "max_inference_replicas": "max_inference_replicas",
    "replica_cpus": "replica_cpus",
    "replica_gpus": "replica_gpus",
    "training_cpus": "training_cpus",
    "training_gpus": "training_gpus",
    "max_queued_trainings": "max_queued_trainings",
}


def test_serve_defaults_are_the_service_and_ray_backend_defaults():
    """serve copies these by hand (the service's config is too heavy to import for --help)."""
    import dataclasses

    from cellpose_finetuning.deploy.ray_backend import RayOptions
    from cellpose_finetuning.service.api import ServiceConfig

    params = {p.name: p for p in _command(("serve",)).params}
    for option, field in SERVE_SERVICE.items():
        assert params[option].default == ServiceConfig.model_fields[field].default, option
    ray = {f.name: f.default for f in dataclasses.fields(RayOptions)}
    for option, field in SERVE_RAY.items():
        assert params[option].default == ray[field], option
