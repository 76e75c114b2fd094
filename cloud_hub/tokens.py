"""API tokens: admin and device bearer tokens created, rotated and revoked at run time.

Only a token's SHA-256 is stored (``api_tokens``); the plaintext is returned once, when it is made.
Every request looks its token up, so a revoked token stops working with the next request. The
bootstrap admin token (``--admin-token`` or ``<data_dir>/admin.token``) is not in this table and
cannot be revoked through the API; it keeps working so an admin can never lock themselves out.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from cloud_hub.db.fleet import ApiTokenRow
from cloud_hub.db.models import DeviceRow, utcnow
from cloud_hub.db.session import Database
from cloud_hub.errors import InvalidInput, NotFound
from cloud_hub.security import Principal, TokenRole, generate_token, hash_token, token_matches
from shared.api_schemas import TokenPublic

__all__ = ["TokenService", "LAST_USED_RESOLUTION"]

# last_used_at is written at most this often per token, so authenticated reads do not all write.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class TokenService:
    """Tokens in the database; the constructor does no I/O."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # --- issuing ---------------------------------------------------------------------------
    def create(
        self, name: str, role: TokenRole, device_id: str | None = None, *, replace: bool = False
    ) -> tuple[TokenPublic, str]:
        """A new token (its plaintext is returned only here). A device token needs a registered device;
        ``replace`` revokes that device's other live tokens in the same transaction (rotation)."""
        with self._db.session() as s:
            if role == "device":
                if not device_id:
                    raise InvalidInput("a device token needs device_id naming a registered device")
                if s.scalar(select(DeviceRow.id).where(DeviceRow.device_id == device_id)) is None:
                    raise NotFound(f"no device {device_id!r} is registered; register it before giving it a token")
                if replace:
                    self._revoke_where(s, ApiTokenRow.device_id == device_id)
            elif device_id:
                raise InvalidInput("an admin token belongs to no device; leave device_id empty")
            elif replace:
                raise InvalidInput("replace applies to device tokens only")
            row, token = self.add(s, name, role, device_id)
            return TokenPublic.model_validate(row), token

    @staticmethod
    def add(s: Session, name: str, role: TokenRole, device_id: str | None) -> tuple[ApiTokenRow, str]:
        """Insert a token row inside the caller's transaction (device registration uses this)."""
        token = generate_token()
        row = ApiTokenRow(name=name, role=role, device_id=device_id, token_hash=hash_token(token))
        s.add(row)
        s.flush()
        return row, token

    def rotate(self, token_id: int) -> tuple[TokenPublic, str]:
        """Revoke a live token and issue its successor with the same name, role and device."""
        with self._db.session() as s:
            old = self._row(s, token_id)
            if old.revoked_at is not None:
                raise InvalidInput(f"token {token_id} is revoked; create a new token instead of rotating it")
            old.revoked_at = utcnow()
            row, token = self.add(s, old.name, old.role, old.device_id)  # type: ignore[arg-type]
            return TokenPublic.model_validate(row), token

    def revoke(self, token_id: int) -> TokenPublic:
        """Revoke a token; revoking it again changes nothing."""
        with self._db.session() as s:
            row = self._row(s, token_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return TokenPublic.model_validate(row)

    # --- reading ---------------------------------------------------------------------------
    def list(
        self,
        *,
        role: TokenRole | None = None,
        device_id: str | None = None,
        active: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[TokenPublic], int]:
        """Tokens, oldest first, without their secrets."""
        conds = []
        if role is not None:
            conds.append(ApiTokenRow.role == role)
        if device_id is not None:
            conds.append(ApiTokenRow.device_id == device_id)
        if active is not None:
            conds.append(ApiTokenRow.revoked_at.is_(None) if active else ApiTokenRow.revoked_at.is_not(None))
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(ApiTokenRow).where(*conds)) or 0
            rows = s.scalars(
                select(ApiTokenRow).where(*conds).order_by(ApiTokenRow.id).limit(limit).offset(offset)
            ).all()
            return [TokenPublic.model_validate(r) for r in rows], total

    def authenticate(self, token: str) -> Principal | None:
        """Who holds ``token``, or None when it is unknown or revoked."""
        digest = hash_token(token)
        with self._db.session() as s:
            row = s.scalars(select(ApiTokenRow).where(ApiTokenRow.token_hash == digest)).one_or_none()
            if row is None or row.revoked_at is not None or not token_matches(token, row.token_hash):
                return None
            now = utcnow()
            if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
                row.last_used_at = now
            return Principal(row.role, row.device_id, row.id)  # type: ignore[arg-type]

    @staticmethod
    def _revoke_where(s: Session, cond: ColumnElement[bool]) -> None:
        s.execute(update(ApiTokenRow).where(cond, ApiTokenRow.revoked_at.is_(None)).values(revoked_at=utcnow()))

    @staticmethod
    def _row(s: Session, token_id: int) -> ApiTokenRow:
        row = s.get(ApiTokenRow, token_id)
        if row is None:
            raise NotFound(f"no token with id {token_id}")
        return row
