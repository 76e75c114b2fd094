"""Retained assignments: the hub publishes each device's pinned version on
``edgefed/v1/{device_id}/assignment`` whenever it changes, and all of them again after every
(re)connection to the broker, so a device that was offline gets its assignment when it reconnects.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import select

from cloud_hub.db.models import DeviceRow
from cloud_hub.db.session import Database
from cloud_hub.gateway import MqttGateway
from shared import topics
from shared.messages import Assignment

__all__ = ["AssignmentPublisher"]

log = logging.getLogger(__name__)


class AssignmentPublisher:
    """Publishes through the gateway's connection; what could not be sent is sent by ``republish_all``."""

    def __init__(self, gateway: MqttGateway, db: Database) -> None:
        self._gateway = gateway
        self._db = db
        self.resync = threading.Event()  # set on (re)connection and after a failed publish
        self.published = 0

    @property
    def connected(self) -> bool:
        return self._gateway.connected

    def publish(self, device_id: str, model_name: str, version: str, *, quiet: bool = False) -> bool:
        """Publish one device's assignment retained; on failure a full re-publish is scheduled."""
        payload = Assignment(model_name=model_name, version=version).model_dump_json().encode()
        ok = self._gateway.publish_retained(topics.assignment(device_id), payload)
        if ok:
            self.published += 1
        else:
            if not quiet:
                log.warning("assignment %s:%s for %s not published yet (no broker); re-published on reconnection",
                            model_name, version, device_id)
            self.resync.set()
        return ok

    def republish_all(self) -> int:
        """Publish every pinned device's assignment again; the number published."""
        with self._db.session() as s:
            rows = s.execute(
                select(DeviceRow.device_id, DeviceRow.model_name, DeviceRow.assigned_version).where(
                    DeviceRow.assigned_version.is_not(None)
                )
            ).all()
        n = 0
        for device_id, model_name, version in rows:
            if not self.publish(device_id, model_name, version, quiet=True):
                return n
            n += 1
        return n
