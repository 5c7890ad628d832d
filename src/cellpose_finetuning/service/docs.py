"""Render the service's API reference (``docs/api.md``) from its method docstrings.

The docstrings are what Hypha shows remote callers, so they are the
reference; this keeps a readable copy in the repository, and a test fails
when the two drift apart. Regenerate with
``python -m cellpose_finetuning.service.docs > docs/api.md``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from cellpose_finetuning.service.api import CellposeService

__all__ = ["COMPATIBILITY", "render_api_markdown"]

#: How we answer the original hosted service's API: a Markdown section of docs/api.md.
COMPATIBILITY = (Path(__file__).with_name("compatibility.md")).read_text(encoding="utf-8")


def _signature(func: object) -> str:
    original = getattr(func, "__wrapped__", func)
    sig = inspect.signature(original)
    params = [
        str(p).replace("'", "")
        for name, p in sig.parameters.items()
        if name not in ("self", "context", "extra")
    ]
    return ", ".join(params)


def render_api_markdown() -> str:
    """The API reference as Markdown, one section per service method."""
    lines = [
        "# Service API reference",
        "",
        "Generated from the method docstrings of `CellposeService` "
        "(`python -m cellpose_finetuning.service.docs > docs/api.md`); a test keeps it in sync.",
        "Every method also receives the caller's Hypha context, which decides what they may see.",
        "",
    ]
    lines += [*COMPATIBILITY.strip("\n").splitlines(), ""]
    for name in sorted(n for n in dir(CellposeService) if not n.startswith("_")):
        func = getattr(CellposeService, name)
        if not getattr(func, "__is_api__", False):
            continue
        doc = inspect.cleandoc(func.__doc__ or "")
        lines += [f"## `{name}({_signature(func)})`", "", doc, ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render_api_markdown(), end="")
