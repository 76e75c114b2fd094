"""Admin and device API tokens: create, list, rotate, revoke (admin only). Secrets are shown once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_hub.api.deps import AdminDep, RowId, ServicesDep, error_responses
from shared.api_schemas import TokenCreate, TokenCreated, TokenPublic, TokenRole, TokensPublic

router = APIRouter(
    prefix="/api/v1/tokens", tags=["tokens"], responses=error_responses(400, 401, 403, 404, 422)
)


@router.post("", status_code=201, response_model=TokenCreated)
def create_token(body: TokenCreate, services: ServicesDep, _: AdminDep) -> TokenCreated:
    """Create an admin token, or a device token for a registered device (``replace`` revokes the
    device's other live tokens). The answer holds the token, which the hub shows only this once."""
    info, token = services.tokens.create(body.name, body.role, body.device_id, replace=body.replace)
    return TokenCreated(**info.model_dump(), token=token)


@router.get("", response_model=TokensPublic)
def list_tokens(
    services: ServicesDep,
    _: AdminDep,
    role: Annotated[TokenRole | None, Query(description="Only admin or only device tokens.")] = None,
    device_id: Annotated[str | None, Query(description="Only this device's tokens.")] = None,
    active: Annotated[bool | None, Query(description="true: only live tokens; false: only revoked ones.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many items.")] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="Skip this many items.")] = 0,
) -> TokensPublic:
    """Tokens, oldest first, never with their secrets (the bootstrap admin token is not listed)."""
    tokens, count = services.tokens.list(role=role, device_id=device_id, active=active, limit=limit, offset=offset)
    return TokensPublic(data=tokens, count=count)


@router.post("/{token_id}/rotate", status_code=201, response_model=TokenCreated)
def rotate_token(token_id: RowId, services: ServicesDep, _: AdminDep) -> TokenCreated:
    """Revoke a live token and return its successor (same name, role and device), shown only once."""
    info, token = services.tokens.rotate(token_id)
    return TokenCreated(**info.model_dump(), token=token)


@router.delete("/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: RowId, services: ServicesDep, _: AdminDep) -> TokenPublic:
    """Revoke a token: it stops working with the next request. Revoking it again changes nothing."""
    return services.tokens.revoke(token_id)
