"""Sending a round's messages through Flower's ``Grid`` and collecting the replies with a short poll.

Flower 1.41's ``Grid.send_and_receive`` pushes the messages and then asks the SuperLink for replies
every 3 s (a fixed ``time.sleep(3)``), so every round waits on average 1.5 s, at worst 3 s, after
the last reply arrived. ``send_and_receive`` here does the same through the grid's public
``push_messages``/``pull_messages`` with a configurable interval (``EDGEFED_FED_REPLY_POLL_S``,
default 0.2 s; each pull is one small request to the SuperLink).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["DEFAULT_REPLY_POLL_S", "reply_poll_s", "send_and_receive"]

DEFAULT_REPLY_POLL_S = 0.2


def reply_poll_s() -> float:
    """The reply poll interval: ``EDGEFED_FED_REPLY_POLL_S`` (0.01–10 s), else 0.2 s."""
    raw = os.environ.get("EDGEFED_FED_REPLY_POLL_S")
    if raw is None or raw == "":
        return DEFAULT_REPLY_POLL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"EDGEFED_FED_REPLY_POLL_S must be a number of seconds, got {raw!r}") from None
    if not 0.01 <= value <= 10.0:
        raise ValueError(f"EDGEFED_FED_REPLY_POLL_S must be between 0.01 and 10 s, got {raw!r}")
    return value


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float,
                     poll_s: float | None = None) -> list[Message]:
    """Push ``messages``, then pull replies every ``poll_s`` until all came or ``timeout`` passed.

    Same contract as ``Grid.send_and_receive``: returns the replies that arrived in time (error
    replies included), in arrival order.
    """
    interval = reply_poll_s() if poll_s is None else poll_s
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= end:
            break
        time.sleep(min(interval, max(0.0, end - time.monotonic())))
    return replies
