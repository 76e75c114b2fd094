"""Per-device escalation counts, per-version escalation statistics, status changes and (when an admin
enabled it) raw payloads, buffered and written once a second.

At a thousand escalations a second one UPDATE per message would make SQLite the bottleneck and
block paho's network thread; here the network thread only bumps counters under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from datetime import UTC, datetime

from cloud_hub.devices import DeviceService, StatusUpdate
from cloud_hub.escalations import EscalationStore, PayloadPolicy, PayloadRecord, StatCounts, StatKey, minute_of
from shared.messages import EscalationRequest

__all__ = ["DeviceActivity", "MAX_PENDING_PAYLOADS"]

log = logging.getLogger(__name__)

# Payloads waiting for the next flush; beyond this they are dropped (and logged) rather than held in memory.
MAX_PENDING_PAYLOADS = 2000
# Stored payloads are pruned by age and count every this many seconds.
PRUNE_EVERY_S = 10.0


class DeviceActivity:
    """Thread-safe buffer flushed to the database every ``interval`` seconds by its own thread.

    ``escalations`` (optional) receives per-minute statistics and payloads; its payload policy is
    re-read at every flush, so a change made by any hub on the database applies within ``interval``.
    """

    def __init__(
        self, devices: DeviceService, interval: float = 1.0, escalations: EscalationStore | None = None
    ) -> None:
        self._devices = devices
        self._store = escalations
        self._interval = interval
        self._lock = threading.Lock()
        self._escalations: Counter[str] = Counter()
        self._statuses: dict[str, StatusUpdate] = {}
        self._stats: dict[StatKey, StatCounts] = {}
        # Since this process started, per (device, region, edge model, edge version): /metrics counters.
        self._totals: dict[tuple[str, str, str, str], StatCounts] = {}
        self._payloads: list[PayloadRecord] = []
        self._dropped_payloads = 0
        self._policy: PayloadPolicy | None = escalations.default_policy if escalations else None
        self._last_prune = 0.0
        self._bucket: tuple[int, datetime] = (-1, datetime.fromtimestamp(0, UTC))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- called by the gateway (paho's and inference threads) -----------------------------
    def escalation(self, device_id: str) -> None:
        with self._lock:
            self._escalations[device_id] += 1

    def answered(
        self,
        req: EscalationRequest,
        latency_ms: float,
        payload: bytes | None = None,
        label: int | None = None,
        confidence: float | None = None,
    ) -> None:
        """An escalation was answered ``latency_ms`` after it arrived; ``payload`` is kept only while
        payload storage is enabled."""
        key = StatKey(self._minute(), req.device_id, req.region, req.model_name, req.model_version)
        policy = self._policy
        record = None
        if payload is not None and policy is not None and policy.enabled:
            record = PayloadRecord(
                datetime.now(UTC), req.request_id, req.device_id, req.region, req.task,
                req.model_name, req.model_version, label, confidence, bytes(payload),
            )
        with self._lock:
            counts = self._stats.setdefault(key, StatCounts())
            counts.answered += 1
            counts.latency_ms_sum += latency_ms
            total = self._totals.setdefault(key[1:], StatCounts())
            total.answered += 1
            total.latency_ms_sum += latency_ms
            if record is not None:
                if len(self._payloads) < MAX_PENDING_PAYLOADS:
                    self._payloads.append(record)
                else:
                    self._dropped_payloads += 1

    def failed(self, device_id: str, req: EscalationRequest | None = None) -> None:
        """An escalation from ``device_id`` got an error answer (``req`` is None when it did not decode)."""
        if req is None:
            key = StatKey(self._minute(), device_id, "", "", "")
        else:
            key = StatKey(self._minute(), device_id, req.region, req.model_name, req.model_version)
        with self._lock:
            self._stats.setdefault(key, StatCounts()).errors += 1
            self._totals.setdefault(key[1:], StatCounts()).errors += 1

    def totals(self) -> dict[tuple[str, str, str, str], StatCounts]:
        """Answered and refused escalations since this process started, per (device id, region, edge
        model name, edge model version); a copy."""
        with self._lock:
            return {k: StatCounts(c.answered, c.errors, c.latency_ms_sum) for k, c in self._totals.items()}

    def _minute(self) -> datetime:
        """The current minute as the statistics' bucket (cached: escalations arrive by the thousand)."""
        epoch_minute = int(time.time()) // 60
        cached = self._bucket
        if cached[0] != epoch_minute:
            cached = self._bucket = (epoch_minute, minute_of(datetime.fromtimestamp(epoch_minute * 60, UTC)))
        return cached[1]

    def status(self, device_id: str, online: bool, at: float) -> None:
        with self._lock:
            self._statuses[device_id] = StatusUpdate(online=online, at=datetime.fromtimestamp(at, UTC))

    def apply_policy(self, policy: PayloadPolicy) -> None:
        """Use ``policy`` from now on (the REST route calls this so its own worker switches at once)."""
        self._policy = policy

    # --- flushing --------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is buffered; on a database error the data is kept for the next try."""
        with self._lock:
            escalations, self._escalations = self._escalations, Counter()
            statuses, self._statuses = self._statuses, {}
            stats, self._stats = self._stats, {}
            payloads, self._payloads = self._payloads, []
            dropped, self._dropped_payloads = self._dropped_payloads, 0
        if dropped:
            log.warning("dropped %d escalation payloads: more than %d waited for the database", dropped,
                        MAX_PENDING_PAYLOADS)
        try:
            self._devices.apply_activity(dict(escalations), statuses)
        except Exception:  # the database may be briefly locked or down: keep the data, retry next tick
            log.warning("could not write device activity; retrying in %.1f s", self._interval, exc_info=True)
            with self._lock:
                self._escalations.update(escalations)
                for device_id, st in statuses.items():
                    self._statuses.setdefault(device_id, st)
        if self._store is not None:
            self._flush_store(stats, payloads)

    def _flush_store(self, stats: dict[StatKey, StatCounts], payloads: list[PayloadRecord]) -> None:
        assert self._store is not None
        try:
            self._store.record(stats)
        except Exception:  # same as above: keep the counts for the next tick
            log.warning("could not write escalation statistics; retrying", exc_info=True)
            with self._lock:
                for key, c in stats.items():
                    self._stats.setdefault(key, StatCounts()).add(c)
        try:
            self._store.store_payloads(payloads)
        except Exception:
            log.warning("could not store escalation payloads; retrying", exc_info=True)
            with self._lock:
                room = MAX_PENDING_PAYLOADS - len(self._payloads)
                self._payloads[:0] = payloads[: max(room, 0)]
        try:
            self._policy = policy = self._store.policy()
            if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
                self._last_prune = time.monotonic()
                if pruned := self._store.prune(policy):
                    log.info("pruned %d stored escalation payloads (retention %.0f s, at most %d)",
                             pruned, policy.retention_s, policy.max_rows)
        except Exception:
            log.warning("could not read the payload policy or prune payloads; retrying", exc_info=True)

    def start(self) -> None:
        if self._store is not None:
            self._policy = self._store.policy()
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
