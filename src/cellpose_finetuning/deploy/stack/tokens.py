"""Tokens: minting them with the stack's secret, reading their expiry, and the lifetime rule.

The rule, in one place (:func:`check_token_lifetime`): a token that a
deployment keeps using must not expire inside it (the original deployment
failed that way, silently, mid-run). An expired token is refused; so is one
that expires within :data:`~cellpose_finetuning.names.MIN_TOKEN_LIFETIME_S`
(a day), with a message that says how to get a longer one. ``serve
--server-url`` and ``bioengine deploy`` apply it; a BioEngine app, which
exchanges the token for its own at once, only needs it unexpired.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from cellpose_finetuning.deploy.stack.config import USER_RE
from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.names import (
    MIN_TOKEN_LIFETIME_S,
    SERVICE_TOKEN_LIFETIME_S,
    USER_TOKEN_LIFETIME_S,
)

__all__ = [
    "LONGER_TOKEN_HINT",
    "SERVICE_TOKEN_LIFETIME",
    "USER_TOKEN_LIFETIME",
    "check_token_lifetime",
    "mask_token",
    "mint_token",
    "token_expiry",
    "user_workspace",
]

#: Default lifetime of a user's token (``cellpose-finetuning token``).
USER_TOKEN_LIFETIME = USER_TOKEN_LIFETIME_S
#: Default lifetime of the service's own token. The service holds the secret
#: and mints a fresh one at every start (see ``EmbeddedStack.service_token``).
SERVICE_TOKEN_LIFETIME = SERVICE_TOKEN_LIFETIME_S
#: How to get a token that lasts, said by every refusal.
LONGER_TOKEN_HINT = (
    "get a longer one: connected to the server, "
    f"`await server.generate_token({{'expires_in': {USER_TOKEN_LIFETIME_S}}})` "
    "(30 days), or on an embedded stack "
    f"`cellpose-finetuning token --user NAME --expires-in {USER_TOKEN_LIFETIME_S}`"
)


def user_workspace(user_id: str) -> str:
    """The workspace Hypha gives user ``user_id``: ``ws-user-<id>``."""
    return f"ws-user-{user_id}"


def mint_token(
    user_id: str,
    *,
    secret: str,
    expires_in: int = USER_TOKEN_LIFETIME,
    email: str | None = None,
    roles: tuple[str, ...] | list[str] = (),
    workspace: str | None = None,
) -> str:
    """Mint a Hypha token (HS256) for ``user_id`` with the server's JWT secret.

    No login flow is needed on the embedded stack: whoever holds the secret
    (the stack, the service running next to it, ``cellpose-finetuning token``)
    signs tokens that Hypha accepts as its own. The claims are those Hypha's
    ``hypha.core.auth`` writes, with its default issuer and audience.

    Parameters
    ----------
    user_id : str
        The user id (``sub``); the user owns workspace ``ws-user-<id>``.
    secret : str
        The stack's JWT secret (``HYPHA_JWT_SECRET`` of the server).
    expires_in : int
        Lifetime in seconds.
    email : str, optional
        Defaults to ``<id>@example.org``.
    roles : sequence of str
        ``("admin",)`` gives admin rights on every workspace (the service's own
        identity only).
    workspace : str, optional
        Also grant admin rights on this workspace and make it the token's
        current one (where a connection lands by default).

    Returns
    -------
    str
        The token.
    """
    from jose import jwt

    if not isinstance(user_id, str) or not USER_RE.match(user_id):
        raise InvalidInput(
            "user_id", f"{user_id!r} is not a user id (letters, digits, '-', '_', '.', '@')"
        )
    if int(expires_in) <= 0:
        raise InvalidInput("expires_in", f"must be a positive number of seconds, not {expires_in}")
    now = int(time.time())
    own = user_workspace(user_id)
    current = workspace or own
    grants = [f"ws:{own}#a"]
    if current != own:
        grants.append(f"ws:{current}#a")
    if "admin" in roles:
        grants.insert(0, "ws:*#a")
    claims = {
        "iss": "https://amun.ai/",
        "aud": "https://amun-ai.eu.auth0.com/api/v2/",
        "sub": user_id,
        "iat": now,
        "exp": now + int(expires_in),
        "scope": " ".join([*grants, f"wid:{current}"]),
        "gty": "client-credentials",
        "https://amun.ai/roles": list(roles),
        "https://amun.ai/email": email or f"{user_id}@example.org",
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified), or None."""
    from jose import jwt

    try:
        exp = jwt.get_unverified_claims(token).get("exp")
    except Exception:
        return None
    return float(exp) if exp else None


def check_token_lifetime(
    token: str,
    *,
    min_lifetime_s: float = MIN_TOKEN_LIFETIME_S,
    now: float | None = None,
) -> str:
    """Refuse a token that has expired or expires within ``min_lifetime_s``.

    Parameters
    ----------
    token : str
        A JWT; one whose expiry cannot be read passes (the server judges it).
    min_lifetime_s : float
        How long the token must still be valid: a day for a deployment that
        keeps using it, 0 where it is exchanged at once for a longer one.
    now : float, optional
        The current time (seconds since the epoch); ``time.time()`` by default.

    Returns
    -------
    str
        ``token``, unchanged.

    Raises
    ------
    InvalidInput
        Saying when it expires(d) and how to get a longer one.
    """
    exp = token_expiry(token)
    if exp is None:
        return token
    now = time.time() if now is None else now
    when = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if exp <= now:
        raise InvalidInput("token", f"it expired at {when}; {LONGER_TOKEN_HINT}")
    if exp - now < min_lifetime_s:
        hours = (exp - now) / 3600
        raise InvalidInput(
            "token",
            f"it expires in {hours:.1f} h (at {when}), inside the deployment: a token must be "
            f"valid for at least {min_lifetime_s / 3600:g} h; {LONGER_TOKEN_HINT}",
        )
    return token


def mask_token(token: str) -> str:
    """``token`` with all but its first and last few characters hidden."""
    if len(token) <= 16:
        return "*" * len(token)
    return f"{token[:6]}...{token[-4:]}"
