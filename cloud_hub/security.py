"""Bearer tokens: generation, hashing, comparison and the admin token file.

Tokens are random 32-byte urlsafe strings; the hub stores only their SHA-256, so a leaked database
does not leak credentials. Comparisons use ``hmac.compare_digest`` to avoid timing side channels.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "Principal",
    "TokenRole",
    "generate_token",
    "hash_token",
    "token_matches",
    "parse_bearer",
    "load_or_create_admin_token",
]

log = logging.getLogger(__name__)


TokenRole = Literal["admin", "device"]


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin, or one registered device. ``token_id`` is the ``api_tokens`` row behind
    the call (None for the bootstrap admin token from the command line or ``admin.token``)."""

    kind: TokenRole
    device_id: str | None = None
    token_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"


def generate_token() -> str:
    """A new random token (43 urlsafe characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time check of ``token`` against a stored hash."""
    return hmac.compare_digest(hash_token(token), stored_hash)


def parse_bearer(header: str | None) -> str | None:
    """The token in an ``Authorization: Bearer <token>`` header, or None if there is none."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def load_or_create_admin_token(given: str | None, token_file: Path) -> str:
    """The admin token: ``given`` if set, else the one in ``token_file``, else a new one written there.

    The file is created with mode 0600 so only the hub's user can read it.
    """
    if given:
        return given
    if token_file.is_file():
        token = token_file.read_text().strip()
        if token:
            log.info("admin token read from %s", token_file)
            return token
    token = generate_token()
    token_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning("no admin token given: generated one into %s (mode 0600)", token_file)
    return token
