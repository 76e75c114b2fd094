"""The fleet: device registration, tokens, assignments, running versions and live state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_hub.db.models import DeviceRow, utcnow
from cloud_hub.db.session import Database
from cloud_hub.errors import Conflict, InvalidInput, NotFound
from cloud_hub.registry.service import ModelVersionInfo, RegistryService
from cloud_hub.security import generate_token, hash_token, token_matches
from shared.api_schemas import DevicePublic
from shared.topics import validate_device_id

__all__ = ["DeviceService", "StatusUpdate"]


@dataclass(frozen=True)
class StatusUpdate:
    online: bool
    at: datetime


class DeviceService:
    """Devices in the database; ``default_model_name`` is what a device runs unless told otherwise."""

    def __init__(self, db: Database, registry: RegistryService, default_model_name: str) -> None:
        self._db = db
        self._registry = registry
        self.default_model_name = default_model_name

    def register(
        self, device_id: str, region: str = "", model_name: str | None = None
    ) -> tuple[DevicePublic, str]:
        """Register a device; return it with its token, which is not stored and never shown again."""
        try:
            validate_device_id(device_id)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        token = generate_token()
        row = DeviceRow(
            device_id=device_id,
            region=region,
            model_name=model_name or self.default_model_name,
            token_hash=hash_token(token),
            online=False,
            escalations=0,
        )
        try:
            with self._db.session() as s:
                s.add(row)
                s.flush()
                info = DevicePublic.model_validate(row)
        except IntegrityError:
            raise Conflict(f"device {device_id} is already registered; its token stays valid") from None
        return info, token

    def list(self, limit: int = 100, offset: int = 0) -> tuple[list[DevicePublic], int]:
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(DeviceRow)) or 0
            rows = s.scalars(
                select(DeviceRow).order_by(DeviceRow.device_id).limit(limit).offset(offset)
            ).all()
            return [DevicePublic.model_validate(r) for r in rows], total

    def get(self, device_id: str) -> DevicePublic:
        with self._db.session() as s:
            return DevicePublic.model_validate(self._row(s, device_id))

    def authenticate(self, token: str) -> str | None:
        """The id of the device holding ``token``, or None."""
        digest = hash_token(token)
        with self._db.session() as s:
            row = s.execute(
                select(DeviceRow.device_id, DeviceRow.token_hash).where(DeviceRow.token_hash == digest)
            ).first()
        if row is None or not token_matches(token, row.token_hash):
            return None
        return str(row.device_id)

    def assignment(self, device_id: str) -> ModelVersionInfo:
        """The version a device must run: its assigned one, else the newest of its model."""
        device = self.get(device_id)
        name = device.model_name or self.default_model_name
        if device.assigned_version:
            return self._registry.get_version(name, device.assigned_version)
        try:
            return self._registry.latest_version(name)
        except NotFound:
            raise NotFound(
                f"device {device_id} runs model {name!r}, which has no registered version yet; "
                "push a bundle for it"
            ) from None

    def assign(self, device_id: str, version: str | None) -> DevicePublic:
        """Pin a device to ``version`` of its model (None: follow the newest version)."""
        with self._db.session() as s:
            row = self._row(s, device_id)
            if version is not None:
                self._registry.get_version(row.model_name, version)
            row.assigned_version = version
            return DevicePublic.model_validate(row)

    def report_running(self, device_id: str, model_name: str, version: str) -> DevicePublic:
        """Record the version a device says it runs; it must be a registered version of its model."""
        with self._db.session() as s:
            row = self._row(s, device_id)
            if model_name != row.model_name:
                raise InvalidInput(
                    f"device {device_id} is registered for model {row.model_name!r} but reports "
                    f"running {model_name!r}; nothing recorded"
                )
            self._registry.get_version(model_name, version)
            row.running_version = version
            row.last_seen = utcnow()
            return DevicePublic.model_validate(row)

    def apply_activity(self, escalations: dict[str, int], statuses: dict[str, StatusUpdate]) -> None:
        """Add escalation counts and apply status changes in one transaction (unknown devices are ignored)."""
        if not escalations and not statuses:
            return
        now = utcnow()
        with self._db.session() as s:
            for device_id, n in escalations.items():
                s.execute(
                    update(DeviceRow)
                    .where(DeviceRow.device_id == device_id)
                    .values(escalations=DeviceRow.escalations + n, last_seen=now, online=True)
                )
            for device_id, st in statuses.items():
                s.execute(
                    update(DeviceRow)
                    .where(DeviceRow.device_id == device_id)
                    .values(online=st.online, last_seen=st.at)
                )

    @staticmethod
    def _row(s: Session, device_id: str) -> DeviceRow:
        row = s.scalars(select(DeviceRow).where(DeviceRow.device_id == device_id)).one_or_none()
        if row is None:
            raise NotFound(f"no device {device_id!r} is registered")
        return row
