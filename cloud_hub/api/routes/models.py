"""Model registry: push signed bundles and cloud checkpoints, list versions, download artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from cloud_hub.api.deps import AdminDep, PrincipalDep, ServicesDep, read_body
from cloud_hub.registry import ModelVersionInfo
from shared.api_schemas import ModelPublic, ModelsPublic, ModelVersionPublic, ModelVersionsPublic

router = APIRouter(prefix="/api/v1/models", tags=["models"])

Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many items.")]
Offset = Annotated[int, Query(ge=0, description="Skip this many items.")]


def _public(info: ModelVersionInfo) -> ModelVersionPublic:
    return ModelVersionPublic.model_validate(info, from_attributes=True)


@router.post("/bundles", status_code=201, response_model=ModelVersionPublic)
async def push_bundle(request: Request, services: ServicesDep, _: AdminDep) -> ModelVersionPublic:
    """Register a signed edge bundle (the body is its .tar.gz); refused unless hash and signature verify."""
    data = await read_body(request, services.settings.max_upload_bytes)
    return _public(await run_in_threadpool(services.registry.register_bundle, data))


@router.post("/checkpoints", status_code=201, response_model=ModelVersionPublic)
async def push_checkpoint(request: Request, services: ServicesDep, _: AdminDep) -> ModelVersionPublic:
    """Register a cloud checkpoint and make it the active model for its task."""
    data = await read_body(request, services.settings.max_upload_bytes)
    info = await run_in_threadpool(services.registry.register_checkpoint, data)
    await run_in_threadpool(services.activate_cloud, info)
    return _public(info)


@router.get("", response_model=ModelsPublic)
def list_models(
    services: ServicesDep, _: PrincipalDep, limit: Limit = 100, offset: Offset = 0
) -> ModelsPublic:
    models, count = services.registry.list_models(limit, offset)
    return ModelsPublic(
        data=[ModelPublic.model_validate(m, from_attributes=True) for m in models], count=count
    )


@router.get("/{name}/versions", response_model=ModelVersionsPublic)
def list_versions(
    name: str, services: ServicesDep, _: PrincipalDep, limit: Limit = 100, offset: Offset = 0
) -> ModelVersionsPublic:
    """Versions of one model, newest first."""
    versions, count = services.registry.list_versions(name, limit, offset)
    return ModelVersionsPublic(data=[_public(v) for v in versions], count=count)


@router.get("/{name}/versions/{version}", response_model=ModelVersionPublic)
def get_version(name: str, version: str, services: ServicesDep, _: PrincipalDep) -> ModelVersionPublic:
    return _public(services.registry.get_version(name, version))


@router.get("/{name}/versions/{version}/artifact", response_class=FileResponse)
def download_artifact(name: str, version: str, services: ServicesDep, _: PrincipalDep) -> FileResponse:
    """The signed bundle archive (edge) or the checkpoint (cloud), byte for byte as pushed."""
    info = services.registry.get_version(name, version)
    suffix = "tar.gz" if info.kind == "edge" else "pt"
    return FileResponse(
        services.registry.artifact_file(info),
        media_type=info.media_type,
        filename=f"{info.name}-{info.version}.{suffix}",
        headers={"X-Edgefed-Sha256": info.artifact_sha256},
    )
