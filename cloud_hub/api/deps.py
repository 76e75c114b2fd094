"""Dependencies shared by the routers: the hub's services, the caller's identity, request bodies."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request

from cloud_hub.errors import Forbidden, Unauthorized
from cloud_hub.security import Principal, parse_bearer, token_matches
from cloud_hub.services import HubServices
from shared.api_schemas import ErrorPublic

__all__ = [
    "ServicesDep",
    "PrincipalDep",
    "AdminDep",
    "get_services",
    "get_principal",
    "require_admin",
    "ensure_device_or_admin",
    "read_body",
    "error_responses",
    "RowId",
]


_ERROR_DESCRIPTIONS = {
    400: "The input is wrong; detail says what",
    401: "No bearer token, or one the hub does not know (or revoked)",
    403: "The token may not do this (e.g. a device token on an admin call)",
    404: "The named item does not exist",
    409: "Collides with what is already registered",
    413: "The request body is too large",
    422: "A parameter or body field is invalid; detail names it",
    503: "The hub cannot do it right now",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: every error body is ``{"detail": "..."}`` (ErrorPublic),
    422 included (the hub's handler replaces FastAPI's validation error shape)."""
    return {code: {"model": ErrorPublic, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


# Row ids are 32-bit integers in PostgreSQL; larger ones cannot name anything.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The item's id")]


def get_services(request: Request) -> HubServices:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[HubServices, Depends(get_services)]


def get_principal(request: Request, services: ServicesDep) -> Principal:
    """The admin or the device behind the bearer token; Unauthorized if there is none or it is unknown."""
    token = parse_bearer(request.headers.get("authorization"))
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <admin or device token>'")
    if services.admin_token_hash and token_matches(token, services.admin_token_hash):
        return Principal("admin")  # the bootstrap admin token: always valid, not revocable
    principal = services.tokens.authenticate(token)
    if principal is None:
        raise Unauthorized("bearer token is not valid for this hub (unknown or revoked)")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this call needs the admin token; a device token may not do it")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def ensure_device_or_admin(principal: Principal, device_id: str) -> None:
    """Allow the admin, or the device ``device_id`` itself."""
    if not principal.is_admin and principal.device_id != device_id:
        raise Forbidden(f"device {principal.device_id} may not access device {device_id}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body passes the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
