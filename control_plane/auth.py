"""Credentials: operator API tokens, bootstrap tokens and device credentials, kept as hashes.

Tokens are 32 random bytes (URL-safe base64) with a prefix saying what they are for; the
database holds their sha256, which is enough for random secrets (no password stretching needed).
Which route needs which principal is decided in ``control_plane.api.deps``; the bounds of each
kind (expiry, uses, rotation) in the routes that issue them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BOOTSTRAP_TOKEN_PREFIX",
    "DEVICE_TOKEN_PREFIX",
    "OPERATOR_TOKEN_PREFIX",
    "ROLES",
    "Operator",
    "Role",
    "hash_token",
    "new_token",
    "role_allows",
    "tokens_equal",
]

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
OPERATOR_TOKEN_PREFIX = "efo_"  # noqa: S105 - a prefix, not a secret
DEVICE_TOKEN_PREFIX = "efd_"  # noqa: S105 - a prefix, not a secret
BOOTSTRAP_TOKEN_PREFIX = "efb_"  # noqa: S105 - a prefix, not a secret


@dataclass(frozen=True)
class Operator:
    """Who is calling an operator route: a token's name and role."""

    name: str
    role: Role


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(hash_token(given), hash_token(expected))


def role_allows(have: Role, need: Role) -> bool:
    """Roles are ordered: admin can do what an operator can, who can do what a viewer can."""
    return ROLES.index(have) >= ROLES.index(need)
