"""An operator's rollback, remembered across agent restarts.

After ``POST /v1/model/rollback`` the hub usually still assigns the version the operator rolled back
from (its retained ``assignment`` is re-delivered on every connection). The agent must keep serving
the version it rolled back to, and keep ignoring that assignment until a *different* version is
assigned. In memory that is two fields of ``Agent``; this module keeps them in
``<data-dir>/rollback.json`` so a restarted agent does the same instead of re-fetching the version
that was rolled back:

    {"serving": {"name": ..., "version": ...},            the version rolled back to
     "rolled_back_from": {"name": ..., "version": ...}}   the assignment to keep ignoring, and what a
                                                          further rollback goes back to

The file is written atomically (temporary file, fsync, rename) and removed when a new assignment is
applied. An unreadable or malformed file is logged and ignored: the agent then follows the hub.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelRef", "RollbackState", "clear_rollback", "load_rollback", "save_rollback"]

log = logging.getLogger(__name__)

ModelRef = tuple[str, str]
_KEYS = ("name", "version")


@dataclass(frozen=True)
class RollbackState:
    """Which version an operator rolled back to, and from which one."""

    serving: ModelRef
    rolled_back_from: ModelRef

    def to_json(self) -> str:
        return json.dumps(
            {
                "serving": {"name": self.serving[0], "version": self.serving[1]},
                "rolled_back_from": {"name": self.rolled_back_from[0], "version": self.rolled_back_from[1]},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RollbackState:
        """Parse the file's text; ValueError names what is wrong with it."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")

        def ref(key: str) -> ModelRef:
            value = data.get(key)
            if not isinstance(value, dict) or not all(isinstance(value.get(k), str) and value[k] for k in _KEYS):
                raise ValueError(f"{key!r} must be an object with non-empty 'name' and 'version' strings")
            return value["name"], value["version"]

        return cls(serving=ref("serving"), rolled_back_from=ref("rolled_back_from"))


def load_rollback(path: Path) -> RollbackState | None:
    """The remembered rollback, or None (no file, or a file that cannot be used: logged)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the rollback state %s (%s); following the hub's assignment", path, exc)
        return None
    try:
        return RollbackState.from_json(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        log.error("ignoring the malformed rollback state %s (%s); following the hub's assignment", path, exc)
        return None


def save_rollback(path: Path, state: RollbackState) -> None:
    """Write ``state`` atomically: a reader (or a restart after a crash) sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_rollback(path: Path) -> None:
    """Forget the rollback (a new version was assigned and is served)."""
    Path(path).unlink(missing_ok=True)
