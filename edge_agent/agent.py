"""Assembles one edge agent: bundle, runtime, MQTT, escalation, local API; starts and stops them.

``Agent(settings).start()`` does all the I/O (hub, disk, broker) and leaves ``agent.app`` ready to
serve; ``serve()`` runs it under uvicorn until SIGTERM/SIGINT; ``stop()`` publishes the retained
``offline`` status and disconnects. Tests use start()/app/stop() in-process.

A new assignment (the retained ``edgefed/v1/{device}/assignment`` message) only triggers a check:
the hub's REST assignment is authoritative, the bundle is verified before it is loaded, and a
refused or unloadable bundle leaves the current model serving. An operator's rollback outlives a
restart (``edge_agent.rollback``): the version rolled back from stays ignored until another is assigned.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

from pydantic import ValidationError
from starlette.applications import Starlette

from edge_agent.api import RollbackError, RollbackResult, create_app
from edge_agent.breaker import CircuitBreaker
from edge_agent.bundles import BundleStore, fetch_assigned, load_trusted_keys
from edge_agent.config import AgentSettings, MiB
from edge_agent.escalation import CloudAnswer, EscalationClient
from edge_agent.learning_store import LearningStore
from edge_agent.outbox import Outbox, OutboxSender
from edge_agent.policy import make_policy
from edge_agent.redaction import Redactor, load_or_create_salt
from edge_agent.rollback import RollbackState, clear_rollback, load_rollback, save_rollback
from edge_agent.runtime import EdgeRuntime, ModelError
from edge_agent.service import EdgeService
from edge_agent.telemetry import TelemetryPublisher
from shared import topics
from shared.bundle import BundleError, VerifiedBundle
from shared.hub_client import HubClient, HubError
from shared.messages import Assignment, DeviceStatus
from shared.mqtt import Message, MqttClient

__all__ = ["Agent", "AgentStartError"]

log = logging.getLogger(__name__)


class AgentStartError(RuntimeError):
    """The agent has no model it may serve (nothing assigned and verified, nothing verified on disk)."""


class Agent:
    """One edge agent process. Construct, ``start()``, serve ``app``, ``stop()``."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.hub: HubClient | None = None
        self.store: BundleStore | None = None
        self.mqtt: MqttClient | None = None
        self.service: EdgeService | None = None
        self.app: Starlette | None = None
        self._bundle: VerifiedBundle | None = None
        self.outbox: Outbox | None = None
        self._sender: OutboxSender | None = None
        self._updates: ThreadPoolExecutor | None = None
        self._update_lock = threading.Lock()
        self._reported: tuple[str, str] | None = None  # what the hub last accepted as running here
        self.learning: LearningStore | None = None
        self._telemetry: TelemetryPublisher | None = None
        self._previous: tuple[str, str] | None = None  # the bundle served before the current one
        self._rolled_back_from: tuple[str, str] | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model (from the hub, else from disk), connect to the broker, build the API."""
        s = self.settings
        self.hub = HubClient(s.hub_url, s.token, timeout=s.hub_timeout_s)
        trusted = load_trusted_keys(s.trusted_key, s.pinned_keys_path, self.hub)
        self.store = BundleStore(s.bundles_dir, trusted)
        bundle = self._initial_bundle()
        runtime = EdgeRuntime.load(bundle, intra_op_threads=s.intra_op_threads)
        self._bundle = bundle
        self.store.mark_current(bundle)

        offline = DeviceStatus(device_id=s.device_id, state="offline", region=s.region)
        self.mqtt = MqttClient(
            s.broker_url,
            f"edgefed-agent-{s.device_id}",
            will=(topics.status(s.device_id), offline.model_dump_json().encode()),
        )
        escalator = EscalationClient(self.mqtt, s.device_id)
        escalator.subscribe()
        self.outbox = Outbox(s.outbox_path, max_items=s.outbox_max_items).open()
        if len(self.outbox):
            log.info("%d escalation(s) from earlier runs wait in the outbox", len(self.outbox))
        retention = s.learning_retention_days * 86400.0 if s.learning_retention_days else None
        self.learning = LearningStore(s.learning_path, max_items=s.learning_max_items, retention_s=retention).open()
        breaker = CircuitBreaker(
            failures=s.breaker_failures, cooldown_s=s.breaker_cooldown_s, latency_budget_ms=s.breaker_latency_ms
        )
        salt = s.redact_salt.encode() if s.redact_salt else load_or_create_salt(s.salt_path)
        redactor = Redactor(s.redact, salt, drop_unlisted=s.redact_unlisted)
        self.mqtt.subscribe(topics.assignment(s.device_id), self._on_assignment)
        self.mqtt.on_connect(self._on_connect)
        self._updates = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-update")
        # The service exists before the first connection: a retained assignment may arrive at once.
        self.service = EdgeService(
            runtime,
            make_policy(s.policy_config, calibration=bundle.manifest.metrics),
            escalator,
            device_id=s.device_id,
            region=s.region,
            escalation_timeout_s=s.escalation_timeout_s,
            outbox=self.outbox,
            breaker=breaker,
            redactor=redactor,
            learning=self.learning,
            recent_bytes=int(s.feedback_cache_mib * MiB),
        )
        escalator.on_unmatched = self._on_unmatched_answer
        self._sender = OutboxSender(
            self.outbox,
            escalator,
            timeout_s=s.escalation_timeout_s,
            max_backoff_s=s.outbox_max_backoff_s,
            breaker=breaker,
            on_delivered=self.service.apply_late,
        )
        self._sender.start()
        self.mqtt.on_connect(self._sender.kick)
        self._telemetry = TelemetryPublisher(
            self.mqtt, self.service, interval_s=s.telemetry_interval_s, region=s.region
        )
        self._telemetry.start()
        self.app = create_app(self.service, max_body_bytes=s.max_body_bytes, rollback=self.rollback)
        self._report_running(bundle)
        self.mqtt.start(wait=None)  # keeps reconnecting in the background; the edge serves meanwhile
        if not self.mqtt.wait_connected(s.broker_connect_wait_s):
            log.warning("broker %s not reachable yet; answering at the edge until it is", s.broker_url)
        log.info("agent %s serving %s:%s", s.device_id, bundle.manifest.name, bundle.manifest.version)

    def stop(self) -> None:
        """Publish the retained offline status, disconnect, release resources. Safe to call twice."""
        if self._telemetry is not None:
            self._telemetry.stop()
            self._telemetry = None
        if self._updates is not None:
            self._updates.shutdown(wait=True, cancel_futures=True)
            self._updates = None
        if self._sender is not None:
            self._sender.stop()
            self._sender = None
        if self.mqtt is not None:
            if self.mqtt.connected:
                try:
                    self.mqtt.publish(
                        topics.status(self.settings.device_id), self._status("offline"), qos=1, retain=True
                    ).wait_for_publish(2.0)
                except (RuntimeError, ValueError) as exc:  # MqttError, or paho giving up on the publish
                    log.warning("could not publish offline status: %s", exc)
            self.mqtt.stop()
            self.mqtt = None
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None
        if self.learning is not None:
            self.learning.close()
            self.learning = None
        if self.hub is not None:
            self.hub.close()
            self.hub = None

    def serve(self) -> None:
        """start(), serve the API until SIGTERM/SIGINT, then stop()."""
        import uvicorn

        # uvicorn re-raises the signal that stopped it once it has shut down; with the default
        # SIGTERM disposition that would kill us before stop() publishes the offline status.
        def _exit(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, _exit)
        signal.signal(signal.SIGINT, _exit)
        try:
            self.start()
            assert self.app is not None
            config = uvicorn.Config(
                self.app,
                host=self.settings.host,
                port=self.settings.port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
            uvicorn.Server(config).run()
        finally:
            self.stop()

    # --- model updates -------------------------------------------------------------------------
    def apply_assignment(self) -> bool:
        """Ask the hub which bundle to run and switch to it if it differs; True if the model changed.

        A bundle that cannot be fetched, verified or loaded is logged and the current model stays.
        """
        assert self.hub is not None and self.store is not None and self.service is not None
        with self._update_lock:
            current = self.service.runtime
            try:
                bundle = fetch_assigned(self.hub, self.settings.device_id, self.store)
            except HubError as exc:
                log.warning("cannot fetch the assigned bundle (%s); keeping %s:%s", exc, current.name, current.version)
                return False
            except BundleError as exc:
                log.error("refusing bundle: %s; keeping %s:%s", exc, current.name, current.version)
                self._refused(f"refused bundle: {exc}")
                return False
            m = bundle.manifest
            if (m.name, m.version) == (current.name, current.version):
                return False
            if (m.name, m.version) == self._rolled_back_from:
                log.warning(
                    "not switching back to %s:%s: it was rolled back here; assign another version to update",
                    m.name,
                    m.version,
                )
                return False
            try:
                runtime = EdgeRuntime.load(bundle, intra_op_threads=self.settings.intra_op_threads)
            except ModelError as exc:
                log.error(
                    "cannot serve %s:%s (%s); keeping %s:%s",
                    m.name,
                    m.version,
                    exc,
                    current.name,
                    current.version,
                )
                self._refused(f"cannot serve {m.name}:{m.version}: {exc}")
                return False
            self.service.swap(runtime)
            self.service.update_error = None
            self._previous = (current.name, current.version)
            if self._rolled_back_from is not None:
                self._rolled_back_from = None
                clear_rollback(self.settings.rollback_path)
            self._bundle = bundle
            self.store.mark_current(bundle)
        self._report_running(bundle)
        self._publish_online()
        return True

    def _refused(self, reason: str) -> None:
        """Make a refused update visible: /healthz and the retained status carry the reason."""
        assert self.service is not None
        self.service.update_error = reason
        self._publish_online()

    def rollback(self) -> RollbackResult:
        """Serve the bundle that was served before the current one; RollbackError if there is none."""
        assert self.store is not None and self.service is not None
        with self._update_lock:
            current = self.service.runtime
            if self._previous is None:
                raise RollbackError(
                    f"no previous bundle to roll back to: {current.name}:{current.version} is the first this "
                    "agent has served since it started"
                )
            name, version = self._previous
            bundle = self.store.open_existing(name, version)
            if bundle is None:
                raise RollbackError(
                    f"previous bundle {name}:{version} is missing or no longer verifies; "
                    f"keeping {current.name}:{current.version}"
                )
            try:
                runtime = EdgeRuntime.load(bundle, intra_op_threads=self.settings.intra_op_threads)
            except ModelError as exc:
                raise RollbackError(f"{exc}; keeping {current.name}:{current.version}") from None
            try:  # remembered first: a restarted agent must not undo the rollback
                state = RollbackState(serving=(name, version), rolled_back_from=(current.name, current.version))
                save_rollback(self.settings.rollback_path, state)
            except OSError as exc:
                raise RollbackError(
                    f"cannot remember the rollback in {self.settings.rollback_path} ({exc}); "
                    f"keeping {current.name}:{current.version}"
                ) from None
            self.service.swap(runtime)
            self._previous = (current.name, current.version)
            self._rolled_back_from = (current.name, current.version)
            self._bundle = bundle
            self.store.mark_current(bundle)
        log.warning("rolled back from %s:%s to %s:%s", current.name, current.version, name, version)
        self._report_running(bundle)
        self._publish_online()
        return RollbackResult(model_name=name, model_version=version, previous_version=current.version)

    def _on_unmatched_answer(self, answer: CloudAnswer) -> None:
        """paho thread: an answer nobody awaits. If its case is still queued, it is applied now, once."""
        if self.outbox is None or self.service is None:
            return
        payload = self.outbox.take(answer.answer.request_id)
        if payload is not None:
            self.service.apply_late(payload, answer)

    def _on_assignment(self, msg: Message) -> None:
        """paho thread: a (retained) assignment arrived; check it on the update thread."""
        try:
            assignment = Assignment.model_validate_json(msg.payload)
        except ValidationError as exc:
            log.warning("ignoring malformed assignment on %s: %s", msg.topic, exc.errors()[0]["msg"])
            return
        current = self.service.runtime if self.service is not None else None
        wanted = (assignment.model_name, assignment.version)
        if current is not None and wanted == (current.name, current.version):
            return
        if wanted == self._rolled_back_from:
            return  # retained, re-delivered on every reconnection: not a new instruction
        if self._updates is not None:
            log.info("assignment changed to %s:%s", assignment.model_name, assignment.version)
            self._updates.submit(self._safe_apply)

    def _safe_apply(self) -> None:
        try:
            self.apply_assignment()
        except Exception:  # the update thread must survive any bug; the current model keeps serving
            log.exception("bundle update failed; the current model keeps serving")

    # --- helpers -------------------------------------------------------------------------------
    def _initial_bundle(self) -> VerifiedBundle:
        assert self.hub is not None and self.store is not None
        s = self.settings
        remembered = load_rollback(s.rollback_path)
        try:
            assignment = self.hub.get_assignment(s.device_id)
            if remembered is not None:
                kept = self._keep_rollback(remembered, (assignment.model_name, assignment.version))
                if kept is not None:
                    return kept
                remembered = None
            bundle = fetch_assigned(self.hub, s.device_id, self.store, assignment)
            if s.model_name and bundle.manifest.name != s.model_name:
                log.warning(
                    "hub assigns model %s, not %s (--model); following the hub",
                    bundle.manifest.name,
                    s.model_name,
                )
            return bundle
        except HubError as exc:
            log.warning(
                "cannot get the assigned bundle from the hub (%s); using the newest verified bundle on disk",
                exc,
            )
        except BundleError as exc:
            log.error("refusing the assigned bundle: %s; using the newest verified bundle on disk", exc)
        if remembered is not None:
            kept = self._keep_rollback(remembered, None)
            if kept is not None:
                return kept
        local = self.store.best_local(s.model_name)
        if local is None:
            raise AgentStartError(
                f"no model to serve: the hub {s.hub_url} gave no usable bundle and {s.bundles_dir} holds no "
                "bundle that verifies against the trusted keys"
            )
        return local

    def _keep_rollback(self, state: RollbackState, assigned: tuple[str, str] | None) -> VerifiedBundle | None:
        """At start: the rolled-back bundle if the rollback still holds (the hub assigns the version rolled
        back from, or cannot be asked) and it verifies; else None, and the rollback is forgotten."""
        assert self.store is not None
        path = self.settings.rollback_path
        if assigned is not None and assigned != state.rolled_back_from:
            log.info(
                "the hub now assigns %s:%s (not %s:%s, which was rolled back here): following the new assignment",
                *assigned,
                *state.rolled_back_from,
            )
            clear_rollback(path)
            return None
        bundle = self.store.open_existing(*state.serving)
        if bundle is None:
            log.error(
                "the rolled-back bundle %s:%s is missing or no longer verifies; following the hub's assignment",
                *state.serving,
            )
            clear_rollback(path)
            return None
        self._rolled_back_from = state.rolled_back_from
        self._previous = state.rolled_back_from
        log.warning(
            "keeping the rollback to %s:%s made before the restart; %s:%s stays ignored until another version "
            "is assigned",
            *state.serving,
            *state.rolled_back_from,
        )
        return bundle

    def _status(self, state: str) -> bytes:
        s = self.settings
        manifest = self.service.runtime.manifest if self.service is not None else None
        if manifest is None and self._bundle is not None:
            manifest = self._bundle.manifest
        return (
            DeviceStatus(
                device_id=s.device_id,
                state=state,
                region=s.region,  # type: ignore[arg-type]
                model_name=manifest.name if manifest else "",
                model_version=manifest.version if manifest else "",
                last_error=(self.service.update_error or "") if self.service is not None else "",
            )
            .model_dump_json()
            .encode()
        )

    def _on_connect(self) -> None:
        """paho thread, after every (re)connection: announce ourselves; retry a report the hub missed."""
        self._publish_online()
        current = self.service.runtime if self.service is not None else None
        if current is not None and self._reported != (current.name, current.version) and self._updates:
            self._updates.submit(self._report_running_current)

    def _report_running_current(self) -> None:
        if self.service is not None and self.hub is not None:
            self._report_running_model(self.service.runtime.name, self.service.runtime.version)

    def _publish_online(self) -> None:
        if self.mqtt is None or not self.mqtt.connected:
            return
        try:
            status = self._status("online")
            self.mqtt.publish(topics.status(self.settings.device_id), status, qos=1, retain=True)
        except RuntimeError as exc:
            log.warning("could not publish online status: %s", exc)

    def _report_running(self, bundle: VerifiedBundle) -> None:
        self._report_running_model(bundle.manifest.name, bundle.manifest.version)

    def _report_running_model(self, name: str, version: str) -> None:
        assert self.hub is not None
        try:
            self.hub.report_running(self.settings.device_id, name, version)
            self._reported = (name, version)
        except HubError as exc:
            log.warning("could not report the running version to the hub (retried on reconnect): %s", exc)
