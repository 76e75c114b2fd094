"""Model registry: push signed bundles and cloud checkpoints, list versions, download artifacts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from cloud_hub.api.deps import AdminDep, PrincipalDep, ServicesDep, error_responses, read_body
from cloud_hub.registry import ModelVersionInfo
from shared.api_schemas import (
    LineagePublic,
    ModelKind,
    ModelPublic,
    ModelsPublic,
    ModelVersionPublic,
    ModelVersionsPublic,
)

router = APIRouter(
    prefix="/api/v1/models", tags=["models"], responses=error_responses(400, 401, 403, 404, 409, 413, 422)
)

Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many items.")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="Skip this many items.")]


def _public(info: ModelVersionInfo) -> ModelVersionPublic:
    return ModelVersionPublic.model_validate(info, from_attributes=True)


def _raw_body(what: str) -> dict[str, Any]:
    """OpenAPI for a route that reads its body itself: the raw bytes of ``what``."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "description": what, "content": {"application/octet-stream": binary}}}


@router.post(
    "/bundles",
    status_code=201,
    response_model=ModelVersionPublic,
    openapi_extra=_raw_body("A signed bundle archive (.tar.gz, as `edgefed model push` packs it)"),
)
async def push_bundle(request: Request, services: ServicesDep, _: AdminDep) -> ModelVersionPublic:
    """Register a signed edge bundle (the body is its .tar.gz); refused unless hash and signature verify."""
    data = await read_body(request, services.settings.max_upload_bytes)
    return _public(await run_in_threadpool(services.registry.register_bundle, data))


@router.post(
    "/checkpoints",
    status_code=201,
    response_model=ModelVersionPublic,
    openapi_extra=_raw_body("A cloud model checkpoint (.pt written by shared.models.save_checkpoint)"),
)
async def push_checkpoint(request: Request, services: ServicesDep, _: AdminDep) -> ModelVersionPublic:
    """Register a cloud checkpoint and make it the active model for its task."""
    data = await read_body(request, services.settings.max_upload_bytes)
    info = await run_in_threadpool(services.registry.register_checkpoint, data)
    await run_in_threadpool(services.activate_cloud, info)
    return _public(info)


@router.get("", response_model=ModelsPublic)
def list_models(
    services: ServicesDep,
    _: PrincipalDep,
    kind: Annotated[ModelKind | None, Query(description="Only edge or only cloud models.")] = None,
    task: Annotated[str | None, Query(description="Only models of this task.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> ModelsPublic:
    """Models by name with their newest version; ``count`` is the total matching the filters."""
    models, count = services.registry.list_models(limit, offset, kind=kind, task=task)
    return ModelsPublic(
        data=[ModelPublic.model_validate(m, from_attributes=True) for m in models], count=count
    )


@router.get("/{name}/versions", response_model=ModelVersionsPublic)
def list_versions(
    name: str,
    services: ServicesDep,
    _: PrincipalDep,
    parent_version: Annotated[str | None, Query(description="Only children of this version.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> ModelVersionsPublic:
    """Versions of one model, newest first, with metrics and lineage."""
    versions, count = services.registry.list_versions(name, limit, offset, parent_version=parent_version)
    return ModelVersionsPublic(data=[_public(v) for v in versions], count=count)


@router.get("/{name}/versions/{version}", response_model=ModelVersionPublic)
def get_version(name: str, version: str, services: ServicesDep, _: PrincipalDep) -> ModelVersionPublic:
    return _public(services.registry.get_version(name, version))


@router.get("/{name}/versions/{version}/lineage", response_model=LineagePublic)
def get_lineage(name: str, version: str, services: ServicesDep, _: PrincipalDep) -> LineagePublic:
    """The version and its ancestors back to the root, newest first (parents may be in another model
    when the lineage names ``parent_model``)."""
    chain, missing = services.registry.lineage_chain(name, version)
    return LineagePublic(data=[_public(v) for v in chain], count=len(chain), missing_parent=missing)


@router.get(
    "/{name}/versions/{version}/artifact",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The artifact; its SHA-256 is in the X-Edgefed-Sha256 header",
            "content": {"application/gzip": {}, "application/octet-stream": {}},
            "headers": {"X-Edgefed-Sha256": {"schema": {"type": "string"}, "description": "SHA-256 of the file"}},
        }
    },
)
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
