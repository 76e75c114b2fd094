"""A small typed HTTP client for the hub's REST API, used by the CLI, the agent and tests."""

from __future__ import annotations

from pathlib import Path

import httpx

from shared.api_schemas import (
    AssignmentPublic,
    DeviceCreate,
    DeviceCreated,
    DevicePublic,
    DevicesPublic,
    ModelsPublic,
    ModelVersionPublic,
    ModelVersionsPublic,
    RunningReport,
    SigningKeysPublic,
)

__all__ = ["HubError", "HubClient"]

BUNDLE_CONTENT_TYPE = "application/gzip"
CHECKPOINT_CONTENT_TYPE = "application/octet-stream"


class HubError(RuntimeError):
    """The hub answered with an error or could not be reached; ``status`` is the HTTP code (0 = no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class HubClient:
    """Calls the hub under ``{base_url}/api/v1``; ``token`` is an admin or a device token."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- models ----------------------------------------------------------------------------
    def push_bundle(self, archive: bytes) -> ModelVersionPublic:
        """Upload a bundle archive (``shared.bundle.pack_bundle``)."""
        r = self._request("POST", "/api/v1/models/bundles", content=archive,
                          headers={"Content-Type": BUNDLE_CONTENT_TYPE})
        return ModelVersionPublic.model_validate(r.json())

    def push_checkpoint(self, path: Path) -> ModelVersionPublic:
        """Upload a cloud model checkpoint (``shared.models.checkpoint``)."""
        r = self._request("POST", "/api/v1/models/checkpoints", content=Path(path).read_bytes(),
                          headers={"Content-Type": CHECKPOINT_CONTENT_TYPE})
        return ModelVersionPublic.model_validate(r.json())

    def list_models(self) -> ModelsPublic:
        return ModelsPublic.model_validate(self._request("GET", "/api/v1/models").json())

    def list_versions(self, name: str) -> ModelVersionsPublic:
        return ModelVersionsPublic.model_validate(self._request("GET", f"/api/v1/models/{name}/versions").json())

    def download_artifact(self, name: str, version: str) -> bytes:
        return self._request("GET", f"/api/v1/models/{name}/versions/{version}/artifact").content

    def signing_keys(self) -> SigningKeysPublic:
        return SigningKeysPublic.model_validate(self._request("GET", "/api/v1/keys").json())

    # --- devices ---------------------------------------------------------------------------
    def register_device(self, device_id: str, region: str = "", model_name: str | None = None) -> DeviceCreated:
        body = DeviceCreate(device_id=device_id, region=region, model_name=model_name)
        r = self._request("POST", "/api/v1/devices", json=body.model_dump())
        return DeviceCreated.model_validate(r.json())

    def list_devices(self) -> DevicesPublic:
        return DevicesPublic.model_validate(self._request("GET", "/api/v1/devices").json())

    def get_device(self, device_id: str) -> DevicePublic:
        return DevicePublic.model_validate(self._request("GET", f"/api/v1/devices/{device_id}").json())

    def get_assignment(self, device_id: str) -> AssignmentPublic:
        r = self._request("GET", f"/api/v1/devices/{device_id}/assignment")
        return AssignmentPublic.model_validate(r.json())

    def report_running(self, device_id: str, model_name: str, version: str) -> None:
        body = RunningReport(model_name=model_name, version=version)
        self._request("PUT", f"/api/v1/devices/{device_id}/running", json=body.model_dump())

    # --- plumbing --------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise HubError(f"hub {self.base_url} not reachable for {method} {path}: {exc}") from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise HubError(f"hub refused {method} {path}: HTTP {r.status_code}: {detail}", r.status_code)
        return r
