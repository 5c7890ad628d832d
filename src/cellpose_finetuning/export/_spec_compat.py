"""Make bioimageio.spec's serializers work with pydantic-core >= 2.47 (pydantic 2.14).

bioimageio.spec (0.5.12 and its source up to now) calls pydantic's
wrap-serializer handler as ``handler(value, info)``, following an old pydantic
docs example. The second positional argument of that handler is
``index_key``; pydantic-core 2.46 ignored a wrong type there, pydantic-core
2.50 raises ``TypeError: 'index_key' is expected to be an integer or a
string``. Every model description has files, and the spec serializes the
description while validating it (metadata completeness), so with pydantic
2.14 *every* model fails validation with::

    Error calling function `package_file_descr_serializer`: TypeError: 'index_key' ...

The real fix is a dependency pin (``pydantic<2.14``) or a fixed spec release.
Until then :func:`ensure_compatible` swaps the body of the three affected
functions for one that calls ``handler(value)``, which is what pydantic
documents today; the functions keep their identity, so the serializer schemas
pydantic already built use the fixed code. Nothing is changed when the
installed pydantic-core accepts the old call.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["ensure_compatible", "needs_patch"]

_lock = threading.Lock()
_done = False


def needs_patch() -> bool:
    """Whether pydantic-core rejects ``handler(value, info)`` in a wrap serializer."""
    from typing import Annotated

    from pydantic import BaseModel, WrapSerializer

    def serialize(value: Any, handler: Any, info: Any) -> Any:
        return handler(value, info)

    class Probe(BaseModel):
        x: Annotated[int, WrapSerializer(serialize)]

    try:
        Probe(x=1).model_dump()
    except Exception:
        return True
    return False


# Replacement bodies. They are compiled here but run with the globals of the
# module whose function they replace, so they may only use names defined there.
def _package_file_descr_serializer(value: Any, handler: Any, info: Any) -> Any:
    ret = handler(value)
    ret["source"] = _package(value.source, info, sha256=value.sha256)  # type: ignore[name-defined]  # noqa: F821
    return ret


def _package_weights(value: Any, handler: Any, info: Any) -> Any:
    ctxt = packaging_context_var.get()  # type: ignore[name-defined]  # noqa: F821
    if ctxt is not None and ctxt.weights_priority_order is not None:
        for wf in ctxt.weights_priority_order:
            w = getattr(value, wf, None)
            if w is not None:
                break
        else:
            raise ValueError(
                "None of the weight formats in `weights_priority_order`"
                + f" ({ctxt.weights_priority_order}) is present in the given model."
            )
        new_w = w.model_construct(**{k: v for k, v in w if k != "parent"})
        value = value.model_construct(None, **{wf: new_w})
    return handler(value)


def _inner_node_serialize(self: Any, handler: Any, info: Any) -> Any:
    _ = self._inner_node.model_dump(mode=info.mode)
    return handler(self)


def _swap_code(target: Any, replacement: Any) -> None:
    """Give ``target`` the code of ``replacement`` (same signature, no closures)."""
    if target.__code__.co_freevars or replacement.__code__.co_freevars:
        raise RuntimeError(f"cannot patch {target!r}: closures differ")
    for name in ("_package", "packaging_context_var"):
        if name in replacement.__code__.co_names and name not in target.__globals__:
            raise RuntimeError(f"cannot patch {target!r}: {name!r} is not in its module")
    target.__code__ = replacement.__code__


def ensure_compatible() -> bool:
    """Patch bioimageio.spec's serializers if the installed pydantic needs it.

    Returns
    -------
    bool
        True if a patch was applied now or earlier.
    """
    global _done
    with _lock:
        if _done:
            return True
        if not needs_patch():
            return False
        from bioimageio.spec._internal import io_packaging
        from bioimageio.spec._internal.validated_string_with_inner_node import (
            ValidatedStringWithInnerNode,
        )
        from bioimageio.spec.model import v0_4

        _swap_code(io_packaging.package_file_descr_serializer, _package_file_descr_serializer)
        _swap_code(v0_4.package_weights, _package_weights)
        proxy = ValidatedStringWithInnerNode.__dict__.get("_serialize")
        func = getattr(proxy, "wrapped", proxy)
        if func is not None and hasattr(func, "__code__"):
            _swap_code(func, _inner_node_serialize)
        _done = True
        return True
