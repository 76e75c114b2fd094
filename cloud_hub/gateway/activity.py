"""Per-device escalation counts and status changes, buffered and written once a second.

At a thousand escalations a second one UPDATE per message would make SQLite the bottleneck and
block paho's network thread; here the network thread only bumps a counter under a lock.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import UTC, datetime

from cloud_hub.devices import DeviceService, StatusUpdate

__all__ = ["DeviceActivity"]

log = logging.getLogger(__name__)


class DeviceActivity:
    """Thread-safe buffer flushed to the database every ``interval`` seconds by its own thread."""

    def __init__(self, devices: DeviceService, interval: float = 1.0) -> None:
        self._devices = devices
        self._interval = interval
        self._lock = threading.Lock()
        self._escalations: Counter[str] = Counter()
        self._statuses: dict[str, StatusUpdate] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def escalation(self, device_id: str) -> None:
        with self._lock:
            self._escalations[device_id] += 1

    def status(self, device_id: str, online: bool, at: float) -> None:
        with self._lock:
            self._statuses[device_id] = StatusUpdate(online=online, at=datetime.fromtimestamp(at, UTC))

    def flush(self) -> None:
        """Write what is buffered; on a database error the counts are kept for the next try."""
        with self._lock:
            escalations, self._escalations = self._escalations, Counter()
            statuses, self._statuses = self._statuses, {}
        try:
            self._devices.apply_activity(dict(escalations), statuses)
        except Exception:  # the database may be briefly locked or down: keep the data, retry next tick
            log.warning("could not write device activity; retrying in %.1f s", self._interval, exc_info=True)
            with self._lock:
                self._escalations.update(escalations)
                for device_id, st in statuses.items():
                    self._statuses.setdefault(device_id, st)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hub-activity", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after one last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()
