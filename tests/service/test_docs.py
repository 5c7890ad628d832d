"""docs/api.md is the service's own docstrings."""

from pathlib import Path

from cellpose_finetuning.service.docs import render_api_markdown

API_MD = Path(__file__).parents[2] / "docs" / "api.md"


def test_api_reference_is_in_sync_with_the_docstrings():
    assert API_MD.read_text() == render_api_markdown(), (
        "docs/api.md is stale: python -m cellpose_finetuning.service.docs > docs/api.md"
    )


def test_every_contract_method_is_documented():
    text = render_api_markdown()
    for name in (
        "infer",
        "start_training",
        "get_training_status",
        "export_model",
        "list_models_by_dataset",
        "list_pretrained_models",
        "stop_training",
        "restart_training",
        "list_training_sessions",
        "delete_training_session",
        "get_training_capabilities",
    ):
        assert f"## `{name}(" in text
