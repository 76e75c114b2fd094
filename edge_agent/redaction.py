"""Redaction of request metadata before anything leaves the site.

Rules are written ``field:action[,field:action...]``, e.g. ``operator:hash,serial:mask,badge:drop``:

- ``drop``: the field is removed;
- ``hash``: replaced by ``h:`` + HMAC-SHA256(salt, value) (first 16 hex digits), so the hub can still
  group cases by operator without learning who it is, and a dictionary of names does not reverse it
  without the site's salt;
- ``mask``: every character but the last 4 becomes ``*``.

Field names match case-insensitively. Fields without a rule pass unchanged unless ``drop_unlisted``.
Everything that leaves the agent (escalations, the outbox, the learning store) holds only the
redacted metadata: the raw values are never written anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["RedactionError", "RedactionRule", "Redactor", "load_or_create_salt", "parse_rules", "validate_metadata"]

Action = Literal["drop", "hash", "mask"]
_ACTIONS: tuple[str, ...] = ("drop", "hash", "mask")
_FIELD = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_FIELDS = 32
MAX_VALUE = 256


class RedactionError(ValueError):
    """A redaction rule or a metadata object is invalid; nothing was sent."""


@dataclass(frozen=True)
class RedactionRule:
    field: str
    action: Action


def parse_rules(spec: str | list[str] | None) -> list[RedactionRule]:
    """``"operator:hash,serial:mask"`` (or a list of such strings) to rules; RedactionError names a bad one."""
    if spec is None:
        return []
    parts = [spec] if isinstance(spec, str) else list(spec)
    rules: dict[str, RedactionRule] = {}
    for part in parts:
        for item in (p.strip() for p in part.split(",")):
            if not item:
                continue
            field, sep, action = item.partition(":")
            field, action = field.strip(), action.strip().lower()
            if not sep or not _FIELD.match(field):
                raise RedactionError(f"redaction rule {item!r} is invalid: write FIELD:ACTION, e.g. operator:hash")
            if action not in _ACTIONS:
                raise RedactionError(
                    f"redaction rule {item!r}: unknown action {action!r}; choose one of: {', '.join(_ACTIONS)}"
                )
            rules[field.lower()] = RedactionRule(field.lower(), action)  # type: ignore[arg-type]
    return list(rules.values())


def validate_metadata(metadata: object) -> dict[str, str]:
    """Check a client's metadata object: at most 32 string fields with short string values."""
    if not isinstance(metadata, dict):
        raise RedactionError(f"metadata must be a JSON object of strings, got {type(metadata).__name__}")
    if len(metadata) > MAX_FIELDS:
        raise RedactionError(f"metadata has {len(metadata)} fields; at most {MAX_FIELDS} are allowed")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not _FIELD.match(key):
            raise RedactionError(f"metadata field name {key!r} is invalid: use 1-64 letters, digits, '_.-'")
        if not isinstance(value, str | int | float | bool):
            raise RedactionError(f"metadata field {key!r} must be a string or number, not {type(value).__name__}")
        text = str(value)
        if len(text) > MAX_VALUE:
            raise RedactionError(f"metadata field {key!r} is {len(text)} characters; at most {MAX_VALUE}")
        out[key] = text
    return out


class Redactor:
    """Applies the site's rules to one metadata dict; pure apart from the salt it is given."""

    def __init__(self, rules: list[RedactionRule], salt: bytes, *, drop_unlisted: bool = False) -> None:
        if not salt:
            raise RedactionError("the redaction salt is empty; hashing without a salt is reversible by guessing")
        self._rules = {r.field: r.action for r in rules}
        self._salt = salt
        self.drop_unlisted = drop_unlisted

    @property
    def rules(self) -> list[RedactionRule]:
        return [RedactionRule(f, a) for f, a in self._rules.items()]  # type: ignore[arg-type]

    def apply(self, metadata: dict[str, str]) -> dict[str, str]:
        """The metadata as it may leave the site."""
        out: dict[str, str] = {}
        for key, value in metadata.items():
            action = self._rules.get(key.lower())
            if action is None:
                if not self.drop_unlisted:
                    out[key] = value
            elif action == "hash":
                out[key] = "h:" + hmac.new(self._salt, value.encode(), hashlib.sha256).hexdigest()[:16]
            elif action == "mask":
                out[key] = "*" * max(0, len(value) - 4) + value[-4:] if len(value) > 4 else "*" * len(value)
            # drop: nothing
        return out


def load_or_create_salt(path: Path) -> bytes:
    """This site's salt from ``path``; created once (32 random bytes, mode 600) when missing."""
    if path.is_file() and path.stat().st_size >= 16:
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(salt)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return salt
