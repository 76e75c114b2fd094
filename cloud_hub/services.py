"""Every long-lived part of one hub, wired together; ``start()``/``stop()`` run from the app's lifespan."""

from __future__ import annotations

import logging
from typing import Any

from cloud_hub.config import HubSettings
from cloud_hub.db.session import Database
from cloud_hub.devices import DeviceService
from cloud_hub.errors import HubServiceError
from cloud_hub.gateway import DeviceActivity, MqttGateway
from cloud_hub.inference import InferenceService, ModelSpec
from cloud_hub.metrics import HubMetrics
from cloud_hub.registry import ArtifactStore, ModelVersionInfo, RegistryService, TrustedKeys
from cloud_hub.security import hash_token, load_or_create_admin_token

__all__ = ["HubServices"]

log = logging.getLogger(__name__)


class HubServices:
    """Built from settings without I/O; ``start()`` opens the database, loads models and connects."""

    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.metrics = HubMetrics()
        self.db = Database(settings.database_url)
        self.keys = TrustedKeys(tuple(settings.signing_public_keys), settings.keys_dir)
        self.registry = RegistryService(self.db, ArtifactStore(settings.artifacts_dir), self.keys)
        self.devices = DeviceService(self.db, self.registry, settings.default_model_name)
        self.inference = InferenceService(
            settings.device, settings.max_batch_size, settings.max_queue, self.metrics
        )
        self.activity = DeviceActivity(self.devices, settings.activity_flush_s)
        self.gateway = MqttGateway(
            settings.broker_url,
            settings.worker_id,
            self.inference,
            self.activity,
            self.metrics,
            username=settings.broker_username,
            password=settings.broker_password,
            ca_file=str(settings.broker_ca_file) if settings.broker_ca_file else None,
        )
        self.admin_token_hash = ""

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.keys.check()
        self.admin_token_hash = hash_token(load_or_create_admin_token(s.admin_token, s.admin_token_file))
        self.db.open()
        self.inference.start()
        for info in self.registry.latest_cloud_versions():
            try:
                self.activate_cloud(info)
            except (HubServiceError, OSError) as exc:  # one broken artifact must not keep the hub down
                log.error(
                    "cannot load cloud model %s:%s for task %r: %s", info.name, info.version, info.task, exc
                )
        self.activity.start()
        self.gateway.start()
        log.info(
            "hub %s started: data %s, database %s, broker %s, device %s",
            s.worker_id,
            s.data_dir,
            _redact(s.database_url),
            s.broker_url,
            s.device,
        )

    def stop(self) -> None:
        """Stop in dependency order; each step runs even if an earlier one failed."""
        # Inference first: what is queued is still answered while the broker connection is up.
        for step in (self.inference.stop, self.gateway.stop, self.activity.stop, self.db.close):
            try:
                step()
            except Exception:  # stopping must reach the database close whatever happened before
                log.exception("error while stopping the hub (%s)", getattr(step, "__qualname__", step))
        log.info("hub %s stopped: inference, broker connection and database closed", self.settings.worker_id)

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
            "cloud_model": "no cloud model is loaded (push a checkpoint with `edgefed model push`)",
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
