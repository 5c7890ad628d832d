"""Typed errors shared by every layer.

Inside the package we raise these; the service edge turns them into one clear
message for the remote caller, and the CLI into a one-line error and a non-zero
exit code. Every error names the argument or file it is about, so a user knows
what to fix without reading a traceback.
"""

from __future__ import annotations

__all__ = [
    "CellposeFinetuningError",
    "Conflict",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "ResourceLimit",
    "not_found_or_hidden",
]

#: The one hint shown for anything that is missing *or* not the caller's, so an
#: answer never tells whether someone else's session, model or artifact exists.
HIDDEN_HINT = "It does not exist, or you may not use it."


class CellposeFinetuningError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInput(CellposeFinetuningError, ValueError):
    """An argument or an input file is not acceptable.

    Parameters
    ----------
    what : str
        The argument name (``"n_epochs"``) or file path the problem is about.
    reason : str
        What is wrong with it, in the user's words.
    """

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Pickle by the constructor's own arguments (crossing to Ray workers).
        return (type(self), (self.what, self.reason))


class NotFound(CellposeFinetuningError, LookupError):
    """A session, model, artifact or file does not exist (or is not the caller's)."""

    def __init__(self, kind: str, name: str, hint: str = "") -> None:
        self.kind = kind
        self.name = name
        msg = f"{kind} not found: {name!r}"
        self.hint = hint
        super().__init__(f"{msg}. {hint}" if hint else msg)

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.kind, self.name, self.hint))


class Forbidden(CellposeFinetuningError, PermissionError):
    """The caller may not do this (anonymous caller, no write permission...)."""


class Conflict(CellposeFinetuningError):
    """The request clashes with the current state (duplicate name, session busy...)."""


class ResourceLimit(CellposeFinetuningError):
    """A configured limit (pixels, files, epochs, concurrent sessions) was exceeded."""


def not_found_or_hidden(kind: str, name: str, hint: str = HIDDEN_HINT) -> NotFound:
    """The error for "missing" and for "exists but not yours": one identical message.

    Every place that refuses something the caller may not see (a training
    session, a model, a dataset or collection artifact) raises this, so the
    text is the same whether the thing exists or not.

    Parameters
    ----------
    kind : str
        What was asked for ("training session", "model", "artifact").
    name : str
        The name the caller gave.
    hint : str
        Extra text; must not depend on whether the thing exists.
    """
    return NotFound(kind, name, hint)
