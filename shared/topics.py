"""MQTT topic names (PRODUCT.md contract). Build and parse them only here."""

from __future__ import annotations

import re

__all__ = [
    "PREFIX",
    "HUB_SHARE_GROUP",
    "escalate",
    "answer",
    "status",
    "telemetry",
    "assignment",
    "hub_escalate_subscription",
    "hub_telemetry_subscription",
    "device_from_topic",
    "validate_device_id",
]

PREFIX = "edgefed/v1"
HUB_SHARE_GROUP = "hub"
# MQTT wildcards and separators would let one device publish into another's subtree.
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` or raise ValueError naming the rule it breaks."""
    if not _DEVICE_ID.match(device_id):
        raise ValueError(
            f"device id {device_id!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def escalate(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/escalate"


def answer(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/answer"


def status(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/status"


def telemetry(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/telemetry"


def assignment(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/assignment"


def hub_escalate_subscription(group: str = HUB_SHARE_GROUP) -> str:
    """Shared subscription so several hub workers split the escalations between them."""
    return f"$share/{group}/{PREFIX}/+/escalate"


def hub_telemetry_subscription(group: str = f"{HUB_SHARE_GROUP}-telemetry") -> str:
    """Shared subscription: each telemetry message is recorded by one hub worker."""
    return f"$share/{group}/{PREFIX}/+/telemetry"


def device_from_topic(topic: str) -> str:
    """The device id in ``edgefed/v1/{device_id}/...``; ValueError if the topic is not ours."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != PREFIX:
        raise ValueError(f"topic {topic!r} is not an edgefed/v1/<device>/<kind> topic")
    return validate_device_id(parts[2])
