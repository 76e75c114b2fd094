"""The fleet: device registration, tokens, assignments, running versions and live state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_hub.db.models import DeviceRow, UTCDateTime, utcnow
from cloud_hub.db.session import Database
from cloud_hub.errors import Conflict, InvalidInput, NotFound
from cloud_hub.registry.service import ModelVersionInfo, RegistryService
from cloud_hub.tokens import TokenService
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
        # Called with (device_id, model_name, version) after a device's pinned version changed.
        self._assignment_listeners: list[Callable[[str, str, str], None]] = []

    def add_assignment_listener(self, listener: Callable[[str, str, str], None]) -> None:
        """``listener(device_id, model_name, version)`` runs after every committed (re)pin (the hub
        publishes it retained on the device's assignment topic)."""
        self._assignment_listeners.append(listener)

    def _notify(self, device_id: str, model_name: str, version: str) -> None:
        for listener in self._assignment_listeners:
            listener(device_id, model_name, version)

    def register(
        self, device_id: str, region: str = "", model_name: str | None = None
    ) -> tuple[DevicePublic, str]:
        """Register a device; return it with its token, which is not stored and never shown again."""
        try:
            validate_device_id(device_id)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        row = DeviceRow(
            device_id=device_id,
            region=region,
            model_name=model_name or self.default_model_name,
            online=False,
            escalations=0,
        )
        try:
            with self._db.session() as s:
                s.add(row)
                s.flush()
                info = DevicePublic.model_validate(row)
                _, token = TokenService.add(s, "registration", "device", device_id)
        except IntegrityError:
            raise Conflict(
                f"device {device_id} is already registered; its tokens stay valid "
                "(rotate one with POST /api/v1/tokens/{id}/rotate)"
            ) from None
        return info, token

    def list(
        self,
        limit: int = 100,
        offset: int = 0,
        *,
        region: str | None = None,
        online: bool | None = None,
        model_name: str | None = None,
        running_version: str | None = None,
        assigned_version: str | None = None,
    ) -> tuple[list[DevicePublic], int]:
        """Devices by id; each given filter must match exactly."""
        conds = []
        for column, value in (
            (DeviceRow.region, region),
            (DeviceRow.online, online),
            (DeviceRow.model_name, model_name),
            (DeviceRow.running_version, running_version),
            (DeviceRow.assigned_version, assigned_version),
        ):
            if value is not None:
                conds.append(column == value)
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(DeviceRow).where(*conds)) or 0
            rows = s.scalars(
                select(DeviceRow).where(*conds).order_by(DeviceRow.device_id).limit(limit).offset(offset)
            ).all()
            return [DevicePublic.model_validate(r) for r in rows], total

    def counts_by_region(self) -> dict[str, tuple[int, int]]:
        """Registered and online devices per region."""
        with self._db.session() as s:
            rows = s.execute(
                select(DeviceRow.region, func.count(), func.count().filter(DeviceRow.online.is_(True)))
                .group_by(DeviceRow.region)
            ).all()
        return {region: (int(total), int(online)) for region, total, online in rows}

    def get(self, device_id: str) -> DevicePublic:
        with self._db.session() as s:
            return DevicePublic.model_validate(self._row(s, device_id))

    def authenticate(self, token: str) -> str | None:
        """The id of the device holding the live device token ``token``, or None."""
        principal = TokenService(self._db).authenticate(token)
        if principal is None or principal.kind != "device":
            return None
        return principal.device_id

    def assignment(self, device_id: str) -> ModelVersionInfo:
        """The version a device must run: its pinned one (a device never pinned is pinned now)."""
        device = self.get(device_id)
        name = device.model_name or self.default_model_name
        if device.assigned_version:
            return self._registry.get_version(name, device.assigned_version)
        try:
            info = self._fleet_version(name)
        except NotFound:
            raise NotFound(
                f"device {device_id} runs model {name!r}, which has no registered version yet; "
                "push a bundle for it"
            ) from None
        # First contact pins the device: pushing a newer version later does not move it; only an
        # explicit assignment or a rollout does (cloud_hub.rollouts).
        with self._db.session() as s:
            row = self._row(s, device_id)
            pinned = row.assigned_version is None
            if pinned:
                row.assigned_version = info.version
        if pinned:
            self._notify(device_id, name, info.version)
        return info

    def _fleet_version(self, name: str) -> ModelVersionInfo:
        """What a device joining the fleet runs: the version most devices of ``name`` are pinned to,
        else (no device pinned yet) the newest version."""
        with self._db.session() as s:
            top = s.execute(
                select(DeviceRow.assigned_version, func.count().label("n"))
                .where(DeviceRow.model_name == name, DeviceRow.assigned_version.is_not(None))
                .group_by(DeviceRow.assigned_version)
                .order_by(func.count().desc())
            ).first()
        if top is not None:
            return self._registry.get_version(name, top[0])
        return self._registry.latest_version(name)

    def assign(self, device_id: str, version: str | None) -> DevicePublic:
        """Pin a device to ``version`` of its model (None: unpin; its next assignment request pins it
        to the fleet's version, see ``assignment``)."""
        with self._db.session() as s:
            row = self._row(s, device_id)
            if version is not None:
                self._registry.get_version(row.model_name, version)
            row.assigned_version = version
            info = DevicePublic.model_validate(row)
        if version is not None and info.model_name:
            self._notify(device_id, info.model_name, version)
        return info

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
        # One executemany per kind of change: a thousand devices a second must not mean a thousand
        # round trips (Core statements: ORM bulk UPDATE would insist on primary keys).
        t = DeviceRow.__table__
        device, at = bindparam("_device"), bindparam("_at", type_=UTCDateTime())
        with self._db.session() as s:
            conn = s.connection()
            if escalations:
                conn.execute(
                    t.update()
                    .where(t.c.device_id == device)
                    .values(escalations=t.c.escalations + bindparam("_n"), last_seen=at, online=True),
                    [{"_device": d, "_n": n, "_at": now} for d, n in escalations.items()],
                )
            if statuses:
                conn.execute(
                    t.update().where(t.c.device_id == device).values(online=bindparam("_online"), last_seen=at),
                    [{"_device": d, "_online": st.online, "_at": st.at} for d, st in statuses.items()],
                )

    @staticmethod
    def _row(s: Session, device_id: str) -> DeviceRow:
        row = s.scalars(select(DeviceRow).where(DeviceRow.device_id == device_id)).one_or_none()
        if row is None:
            raise NotFound(f"no device {device_id!r} is registered")
        return row
