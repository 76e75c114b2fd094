"""Logging setup for every ``edgefed`` process: text or JSON lines, with the current request id.

The request id lives in a ``contextvars.ContextVar``: the hub's MQTT gateway sets it to the
escalation's id (its MQTT Correlation Data) while it handles that escalation, and the REST
middleware sets it from (or generates) the ``X-Request-ID`` header. A logging filter copies it onto
every record as ``record.request_id``, so both formats show it without the callers passing it.

JSON lines carry ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``request_id`` (when
one is set), ``exc_info`` (the formatted traceback, when there is one) and any ``extra=`` fields.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "RequestIdFilter",
    "configure_logging",
    "current_request_id",
    "new_request_id",
    "request_context",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgefed_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and goes into JSON.
# (uvicorn's ``color_message`` is its message with terminal colours: never wanted in JSON.)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_tag", "color_message"
}


def current_request_id() -> str | None:
    """The request id of the escalation or HTTP request being handled in this context, if any."""
    return _request_id.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


@contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Within the block, log records of this thread/task carry ``request_id``."""
    token = _request_id.set(request_id or None)
    try:
        yield
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or None) and ``request_tag`` (`` [id]`` or empty) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or _request_id.get()
        record.request_id = rid
        record.request_tag = f" [{rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "request_id" and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str | int = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one stream handler in ``fmt`` ('text' or 'json').

    Raises ValueError naming the problem for an unknown format or level.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of: {', '.join(LOG_FORMATS)}")
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"log level {level!r} is not one of: DEBUG, INFO, WARNING, ERROR, CRITICAL")
        level = name
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
