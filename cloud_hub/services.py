"""Every long-lived part of one hub, wired together; ``start()``/``stop()`` run from the app's lifespan."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Literal

from cloud_hub.config import HubSettings
from cloud_hub.db.session import Database
from cloud_hub.devices import DeviceService
from cloud_hub.errors import HubServiceError
from cloud_hub.escalations import DEFAULT_PAYLOAD_POLICY, EscalationStore
from cloud_hub.federation import FederationConfig, FederationScheduler, FederationService
from cloud_hub.gateway import DeviceActivity, MqttGateway
from cloud_hub.inference import InferenceService, ModelSpec
from cloud_hub.metrics import FleetCollector, HubMetrics
from cloud_hub.registry import ArtifactStore, ModelVersionInfo, RegistryService, TrustedKeys
from cloud_hub.rollouts.controller import RolloutController
from cloud_hub.rollouts.health import HealthRecorder
from cloud_hub.rollouts.publisher import AssignmentPublisher
from cloud_hub.security import hash_token, load_or_create_admin_token
from cloud_hub.tokens import TokenService

__all__ = ["HubServices"]

log = logging.getLogger(__name__)


class HubServices:
    """Built from settings without I/O; ``start()`` opens the database, loads models and connects."""

    def __init__(self, settings: HubSettings, *, role: Literal["api", "worker"] = "api") -> None:
        """``role="api"`` (``hub serve``) migrates the database and owns the admin token; ``"worker"``
        (``hub worker``) waits for the schema, answers escalations, and follows newly pushed cloud models."""
        self.settings = settings
        self.role = role
        self._refresh_stop = threading.Event()
        self._refresh_thread: threading.Thread | None = None
        self._gateway_lock = threading.Lock()  # the loader's gateway.start() vs stop()
        self._models_loading = False
        self._failed_models: set[tuple[str, str]] = set()
        self.metrics = HubMetrics()
        self.db = Database(settings.database_url)
        self.keys = TrustedKeys(tuple(settings.signing_public_keys), settings.keys_dir)
        self.registry = RegistryService(self.db, ArtifactStore(settings.artifacts_dir), self.keys)
        self.devices = DeviceService(self.db, self.registry, settings.default_model_name)
        self.inference = InferenceService(
            settings.device,
            settings.max_batch_size,
            settings.max_queue,
            self.metrics,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            request_deadline_ms=settings.request_deadline_ms or None,
            warmup_batches=settings.warmup_batches,
            cpu_runtime=settings.cpu_runtime,
            cpu_threads=settings.cpu_threads,
        )
        self.tokens = TokenService(self.db)
        self.escalations = EscalationStore(self.db, DEFAULT_PAYLOAD_POLICY, settings.stats_retention_s)
        self.activity = DeviceActivity(self.devices, settings.activity_flush_s, self.escalations)
        self.gateway = MqttGateway(
            settings.broker_url,
            settings.worker_id,
            self.inference,
            self.activity,
            self.metrics,
            username=settings.broker_username,
            password=settings.broker_password,
            ca_file=str(settings.broker_ca_file) if settings.broker_ca_file else None,
            max_payload_bytes=settings.max_escalation_bytes,
        )
        self.federation = FederationService(
            self.db,
            self.registry,
            FederationConfig.from_settings(settings),
            on_cloud_registered=self.activate_cloud,
            rollout_hook=self._start_rollout,
        )
        self.fed_schedules = FederationScheduler(self.db, self.federation)
        # Rollouts: telemetry -> health samples; assignments published retained through the gateway.
        # ``self.rollouts.start(plan)`` takes a ``shared.rollouts.RolloutCreate`` (or its dict) and
        # returns the started ``RolloutPublic``; the federation hand-over calls it.
        self.health = HealthRecorder(self.db, retention_s=settings.telemetry_retention_s)
        self.assignments = AssignmentPublisher(self.gateway, self.db)
        self.rollouts = RolloutController(
            self.db,
            self.devices,
            self.registry,
            self.health,
            self.assignments,
            tick_s=settings.rollout_tick_s,
            lookback_s=settings.health_lookback_s,
        )
        if role == "api":  # one process records health and runs the controller
            self.gateway.set_telemetry_sink(self.health.record)
            self.gateway.add_connect_hook(self.rollouts.request_republish)
        self.devices.add_assignment_listener(self.assignments.publish)
        self.metrics.registry.register(
            FleetCollector(self.activity.totals, self.devices.counts_by_region if role == "api" else None)
        )
        self.admin_token_hash = ""

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.keys.check()
        if self.role == "api":
            self.admin_token_hash = hash_token(load_or_create_admin_token(s.admin_token, s.admin_token_file))
            self.db.open()
            if (s.store_payloads, s.payload_retention_s, s.payload_max_rows) != (None, None, None):
                current = self.escalations.policy()
                enabled = current.enabled if s.store_payloads is None else s.store_payloads
                self.escalations.set_policy(enabled, s.payload_retention_s, s.payload_max_rows)
        else:  # one process (the API hub) owns migrations; workers wait for it
            self.db.open(migrate=False, wait_s=s.db_wait_s)
        self.inference.start()
        self.activity.start()
        if self.role == "api":  # one process submits and schedules federation runs
            self.federation.start()
            self.fed_schedules.start()
            self.rollouts.start_ticking()
        # Loading and warming the cloud models takes seconds per model; it runs in the background so
        # that HTTP (healthz, metrics) answers meanwhile. readyz stays 503 until the models are warm
        # and the broker is connected; the gateway subscribes to escalations only once they are warm.
        self._refresh_stop.clear()
        self._models_loading = True
        self._refresh_thread = threading.Thread(target=self._load_models_then_serve, name="hub-models", daemon=True)
        self._refresh_thread.start()
        log.info(
            "hub %s %s started: data %s, database %s, broker %s, device %s",
            self.role,
            s.worker_id,
            s.data_dir,
            _redact(s.database_url),
            s.broker_url,
            s.device,
        )

    def stop(self) -> None:
        """Stop in dependency order; each step runs even if an earlier one failed."""
        # Leave the shared subscription first so the broker hands new escalations to the other workers,
        # then drain inference: what is queued is still answered while the broker connection is up.
        self._refresh_stop.set()
        with self._gateway_lock:  # after this, a loader still warming a model never connects
            pass
        if self._refresh_thread is not None:
            self._refresh_thread.join(60)  # a model in warm-up finishes first
            self._refresh_thread = None
        steps = (
            self.rollouts.stop_ticking,
            self.fed_schedules.stop,
            self.federation.stop,
            self.gateway.pause,
            self.inference.stop,
            self.gateway.stop,
            self.activity.stop,
            self.db.close,
        )
        for step in steps:
            try:
                step()
            except Exception:  # stopping must reach the database close whatever happened before
                log.exception("error while stopping the hub (%s)", getattr(step, "__qualname__", step))
        log.info("hub %s stopped: inference, broker connection and database closed", self.settings.worker_id)

    def load_cloud_models(self) -> int:
        """Activate each task's latest registered cloud version that is not active yet; return how many.

        A version that fails to load is logged once and not retried: one broken artifact must not keep
        the hub down."""
        active = {(m.name, m.version) for m in self.inference.specs().values()}
        loaded = 0
        for info in self.registry.latest_cloud_versions():
            if (info.name, info.version) in active or (info.name, info.version) in self._failed_models:
                continue
            try:
                self.activate_cloud(info)
                loaded += 1
            except (HubServiceError, OSError) as exc:
                self._failed_models.add((info.name, info.version))
                log.error(
                    "cannot load cloud model %s:%s for task %r: %s", info.name, info.version, info.task, exc
                )
        return loaded

    def _load_models_then_serve(self) -> None:
        """The ``hub-models`` thread: load the registered cloud models, then answer escalations; a
        worker then keeps picking up the versions the API hub registers (it has no push route)."""
        while True:
            try:
                loaded = self.load_cloud_models()
                break
            except Exception:  # the database may be briefly unavailable; try again
                log.warning(
                    "could not load the registered cloud models; retrying in %.0f s",
                    self.settings.model_refresh_s,
                    exc_info=True,
                )
                if self._refresh_stop.wait(self.settings.model_refresh_s):
                    return
        with self._gateway_lock:
            if self._refresh_stop.is_set():
                return
            self.gateway.start()
        self._models_loading = False
        # Everything loaded so far (torch, the models, SQLAlchemy, FastAPI: millions of objects) lives
        # as long as the process: keep it out of the cyclic collector's full passes, which would
        # otherwise walk all of it again and again under a steady stream of escalations.
        gc.freeze()
        log.info("%d cloud model(s) warm; answering escalations from %s", loaded, self.settings.broker_url)
        if self.role != "worker":
            return
        while not self._refresh_stop.wait(self.settings.model_refresh_s):
            try:
                self.load_cloud_models()
            except Exception:  # the database may be briefly unavailable; try again next tick
                log.warning("could not look for new cloud models", exc_info=True)

    def _start_rollout(self, run_id: int, info: ModelVersionInfo, plan: dict[str, Any]) -> str:
        """The hook from a federation run whose version passed its gate to the rollout controller (built after
        the federation service, hence this indirection)."""
        return self.rollouts.start_handover(run_id, info, plan)

    def activate_cloud(self, info: ModelVersionInfo) -> ModelSpec:
        """Make a registered cloud version the active model for its task."""
        return self.inference.load(self.registry.artifact_file(info))

    def readiness(self) -> dict[str, Any]:
        """What readyz reports: each check and, when not ready, what is missing."""
        checks = {
            "database": self.db.ping(),
            "broker": self.gateway.connected,
            "cloud_model": self.inference.has_models(),
        }
        missing = [name for name, ok in checks.items() if not ok]
        why = {
            "database": f"database {_redact(self.settings.database_url)} is not reachable",
            "broker": f"no connection to broker {self.settings.broker_url}",
            "cloud_model": "the registered cloud models are still loading (warm-up)"
            if self._models_loading
            else "no cloud model is loaded (push a checkpoint with `edgefed model push`)",
        }
        detail = "ready" if not missing else "not ready: " + "; ".join(why[m] for m in missing)
        return {
            "ready": not missing,
            "checks": checks,
            "missing": missing,
            "detail": detail,
            "models": {t: f"{m.name}:{m.version}" for t, m in self.inference.specs().items()},
        }


def _redact(url: str) -> str:
    """A database URL without its password, for logs and readyz."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL is reported elsewhere; here it just is not shown
        return "<database url>"
