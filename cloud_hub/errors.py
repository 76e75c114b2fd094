"""The hub's service-layer exceptions; the route layer alone maps them to HTTP status codes.

    HubServiceError          base; ``kind`` is a short machine-readable tag (also a metric label)
    ├── NotFound             the named model, version, device or task does not exist
    ├── Conflict             the request collides with what is already registered
    ├── InvalidInput         the input itself is wrong (bad bundle, checkpoint, tensor, frame)
    ├── Unauthorized         no credentials, or credentials the hub does not know
    ├── Forbidden            valid credentials that may not do this
    └── Unavailable          the hub cannot do it right now (overloaded, stopping)

Messages name the cause and what happens next, because they reach users verbatim as ``detail``.
"""

from __future__ import annotations

__all__ = [
    "HubServiceError",
    "NotFound",
    "Conflict",
    "InvalidInput",
    "Unauthorized",
    "Forbidden",
    "Unavailable",
]


class HubServiceError(Exception):
    """Base of every error a hub service raises on purpose."""

    kind = "error"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self)


class NotFound(HubServiceError):
    kind = "not_found"


class Conflict(HubServiceError):
    kind = "conflict"


class InvalidInput(HubServiceError):
    kind = "bad_input"


class Unauthorized(HubServiceError):
    kind = "unauthorized"


class Forbidden(HubServiceError):
    kind = "forbidden"


class Unavailable(HubServiceError):
    kind = "unavailable"
