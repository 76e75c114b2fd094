"""The public keys this hub trusts for bundles (public: agents fetch them before they hold a token)."""

from __future__ import annotations

from fastapi import APIRouter

from cloud_hub.api.deps import ServicesDep
from shared.api_schemas import SigningKeysPublic

router = APIRouter(prefix="/api/v1/keys", tags=["keys"])


@router.get("", response_model=SigningKeysPublic)
def signing_keys(services: ServicesDep) -> SigningKeysPublic:
    return SigningKeysPublic(keys=services.keys.pems())
