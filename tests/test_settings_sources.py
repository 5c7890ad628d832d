"""One source for every setting: the service, the web page and the CLI agree with the models.

``TrainingSettings`` and ``InferenceSettings`` (engine/schemas.py) hold each
setting's default, bounds and help. The service's method signatures take their
defaults from them, the web page gets them from ``get_training_capabilities``,
and the CLI's options are generated from them. These tests fail when one side
is edited by hand.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from cellpose_finetuning.engine.recipes import CONTRACT_DEFAULTS
from cellpose_finetuning.engine.schemas import (
    INFERENCE_DEFAULTS,
    TRAINING_DEFAULTS,
    InferenceSettings,
    TrainingSettings,
)
from cellpose_finetuning.io.annotations import POLYGON_SUFFIXES
from cellpose_finetuning.io.images import SUPPORTED_IMAGE_SUFFIXES
from cellpose_finetuning.service.api import CellposeService, ServiceConfig
from cellpose_finetuning.service.payloads import MODEL_NAME

WEB = Path(__file__).resolve().parents[1] / "src" / "cellpose_finetuning" / "web" / "static"

#: Service methods and the settings model their same-named arguments belong to.
METHODS = {
    "infer": InferenceSettings,
    "evaluate": InferenceSettings,
    "export_model": InferenceSettings,
    "start_training": TrainingSettings,
    "preflight_training_dataset": TrainingSettings,
}
DEFAULTS = {InferenceSettings: INFERENCE_DEFAULTS, TrainingSettings: TRAINING_DEFAULTS}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_service_signature_defaults_are_the_settings_defaults(method: str) -> None:
    model = METHODS[method]
    params = inspect.signature(getattr(CellposeService, method)).parameters
    shared = [name for name in params if name in model.model_fields]
    assert shared, f"{method} takes none of {model.__name__}'s settings"
    for name in shared:
        assert params[name].default == DEFAULTS[model][name], (
            f"{method}({name}=...) defaults to {params[name].default!r}, "
            f"{model.__name__}.{name} to {DEFAULTS[model][name]!r}"
        )


def test_contract_recipe_is_the_signature_defaults() -> None:
    # apply_recipe treats a value equal to the contract's default as "not given".
    params = inspect.signature(CellposeService.start_training).parameters
    for name, value in CONTRACT_DEFAULTS.items():
        assert TRAINING_DEFAULTS[name] == value
        if name in params:
            assert params[name].default == value


@pytest.fixture(scope="module")
def capabilities(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import asyncio

    svc = CellposeService(ServiceConfig(data_dir=tmp_path_factory.mktemp("caps")))
    return asyncio.run(svc.get_training_capabilities())


def _schema_of(model: type) -> dict:
    return {
        name: {k: v for k, v in prop.items() if k != "title"}
        for name, prop in model.model_json_schema()["properties"].items()
    }


def test_served_schema_is_the_models(capabilities: dict) -> None:
    training = _schema_of(TrainingSettings)
    for name, spec in capabilities["parameters"].items():
        expected = dict(training[name])
        if name == "n_epochs":  # the service's own cap may be lower
            expected["maximum"] = spec["maximum"]
        assert spec == expected, name
    inference = _schema_of(InferenceSettings)
    assert capabilities["inference_parameters"]
    for name, spec in capabilities["inference_parameters"].items():
        assert spec == inference[name], name
    # every threshold the service's methods take is described for the web page
    for method in ("infer", "evaluate", "export_model"):
        params = inspect.signature(getattr(CellposeService, method)).parameters
        taken = {n for n in params if n in InferenceSettings.model_fields} - {
            "return_flows",
            "enable_clahe",
        }
        assert taken <= set(capabilities["inference_parameters"]), method
    assert re.fullmatch(capabilities["model_name_pattern"], "my-model-v1")
    assert capabilities["model_name_pattern"] == MODEL_NAME.pattern


def _js(path: str) -> str:
    return (WEB / path).read_text(encoding="utf-8")


@pytest.mark.parametrize("panel", ["js/panels/segment.js", "js/panels/export.js"])
def test_web_panels_declare_no_bound_or_default_of_their_own(panel: str) -> None:
    text = _js(panel)
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "default"):
        assert not re.search(rf"\b{key}\s*:", text), f"{panel} declares a {key}"
    assert "applySchema" in text
    assert not re.search(r"const MODEL_NAME\s*=\s*/", text)


def test_web_form_fields_take_their_values_from_the_schema() -> None:
    html = _js("index.html")
    for field in ("seg-flow", "seg-cellprob", "seg-diameter", "seg-niter", "export-flow"):
        tag = re.search(rf'<input id="{field}"[^>]*>', html)
        assert tag, field
        assert "value=" not in tag.group(0), f"#{field} has a value of its own"
    assert "0.4" not in html


def _js_list(text: str, name: str) -> list[str]:
    body = re.search(rf"export const {name} = \[(.*?)\];", text, re.S)
    assert body, name
    return re.findall(r'"([^"]+)"', body.group(1))


def test_web_suffixes_are_the_readers() -> None:
    pairing = _js("js/pairing.js")
    assert sorted(_js_list(pairing, "IMAGE_SUFFIXES")) == sorted(SUPPORTED_IMAGE_SUFFIXES)
    assert sorted(_js_list(pairing, "ANNOTATION_ONLY_SUFFIXES")) == sorted(POLYGON_SUFFIXES)


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_defaults(section: str) -> dict[str, str]:
    """``| `field` | default | ...`` rows of one README section: field -> default cell."""
    text = README.read_text(encoding="utf-8").split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_A-Z0-9]+)` \| ([^|]+) \|", text, re.M)
    return {name: cell.strip().strip("`") for name, cell in rows}


def _same(cell: str, value: object) -> bool:
    if value is None:
        return cell == "None"
    return float(cell) == float(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("section", "defaults"),
    [
        ("Inference parameters", INFERENCE_DEFAULTS),
        ("Training settings, honestly", TRAINING_DEFAULTS),
    ],
)
def test_readme_tables_show_the_settings_defaults(section: str, defaults: dict) -> None:
    rows = {k: v for k, v in _readme_defaults(section).items() if k in defaults}
    assert rows, f"no settings table in README section {section!r}"
    for name, cell in rows.items():
        assert _same(cell, defaults[name]), f"README {section}: {name}={cell}, not {defaults[name]}"
