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
    EscalationStatsPublic,
    LineagePublic,
    ModelsPublic,
    ModelVersionPublic,
    ModelVersionsPublic,
    PayloadStoragePublic,
    PayloadStorageUpdate,
    RunningReport,
    SigningKeysPublic,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    TokensPublic,
)
from shared.federation_api import (
    FedRoundCreate,
    FedRunPublic,
    FedRunsPublic,
    FedScheduleCreate,
    FedSchedulePublic,
    FedSchedulesPublic,
)
from shared.rollouts import RolloutCreate, RolloutPublic, RolloutsPublic

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

    def list_versions(self, name: str, limit: int = 100, offset: int = 0) -> ModelVersionsPublic:
        r = self._request("GET", f"/api/v1/models/{name}/versions", params={"limit": limit, "offset": offset})
        return ModelVersionsPublic.model_validate(r.json())

    def lineage(self, name: str, version: str) -> LineagePublic:
        """``name:version`` and its ancestors back to the root, newest first."""
        return LineagePublic.model_validate(
            self._request("GET", f"/api/v1/models/{name}/versions/{version}/lineage").json()
        )

    def download_artifact(self, name: str, version: str) -> bytes:
        return self._request("GET", f"/api/v1/models/{name}/versions/{version}/artifact").content

    def signing_keys(self) -> SigningKeysPublic:
        return SigningKeysPublic.model_validate(self._request("GET", "/api/v1/keys").json())

    # --- devices ---------------------------------------------------------------------------
    def register_device(self, device_id: str, region: str = "", model_name: str | None = None) -> DeviceCreated:
        body = DeviceCreate(device_id=device_id, region=region, model_name=model_name)
        r = self._request("POST", "/api/v1/devices", json=body.model_dump())
        return DeviceCreated.model_validate(r.json())

    def list_devices(self, limit: int = 100, offset: int = 0, **filters: str | bool | None) -> DevicesPublic:
        """``filters``: region, online, model, running_version, assigned_version (None: not filtered)."""
        params = {"limit": limit, "offset": offset, **_query(filters)}
        return DevicesPublic.model_validate(self._request("GET", "/api/v1/devices", params=params).json())

    def get_device(self, device_id: str) -> DevicePublic:
        return DevicePublic.model_validate(self._request("GET", f"/api/v1/devices/{device_id}").json())

    def get_assignment(self, device_id: str) -> AssignmentPublic:
        r = self._request("GET", f"/api/v1/devices/{device_id}/assignment")
        return AssignmentPublic.model_validate(r.json())

    def report_running(self, device_id: str, model_name: str, version: str) -> None:
        body = RunningReport(model_name=model_name, version=version)
        self._request("PUT", f"/api/v1/devices/{device_id}/running", json=body.model_dump())

    # --- tokens ----------------------------------------------------------------------------
    def create_token(
        self, name: str, role: str, device_id: str | None = None, replace: bool = False
    ) -> TokenCreated:
        body = TokenCreate.model_validate({"name": name, "role": role, "device_id": device_id, "replace": replace})
        return TokenCreated.model_validate(self._request("POST", "/api/v1/tokens", json=body.model_dump()).json())

    def list_tokens(self, limit: int = 100, offset: int = 0, **filters: str | bool | None) -> TokensPublic:
        """``filters``: role, device_id, active."""
        params = {"limit": limit, "offset": offset, **_query(filters)}
        return TokensPublic.model_validate(self._request("GET", "/api/v1/tokens", params=params).json())

    def rotate_token(self, token_id: int) -> TokenCreated:
        return TokenCreated.model_validate(self._request("POST", f"/api/v1/tokens/{token_id}/rotate").json())

    def revoke_token(self, token_id: int) -> TokenPublic:
        return TokenPublic.model_validate(self._request("DELETE", f"/api/v1/tokens/{token_id}").json())

    # --- escalations -----------------------------------------------------------------------
    def escalation_stats(
        self, group_by: str = "device", limit: int = 100, offset: int = 0, **filters: object
    ) -> EscalationStatsPublic:
        """``filters``: since, until (datetimes), device_id, region, model_name, model_version."""
        params = {"group_by": group_by, "limit": limit, "offset": offset, **_query(filters)}
        r = self._request("GET", "/api/v1/escalations/stats", params=params)
        return EscalationStatsPublic.model_validate(r.json())

    def payload_storage(self) -> PayloadStoragePublic:
        return PayloadStoragePublic.model_validate(self._request("GET", "/api/v1/escalations/payload-storage").json())

    def set_payload_storage(
        self, enabled: bool, retention_s: float | None = None, max_rows: int | None = None
    ) -> PayloadStoragePublic:
        body = PayloadStorageUpdate(enabled=enabled, retention_s=retention_s, max_rows=max_rows)
        r = self._request("PUT", "/api/v1/escalations/payload-storage", json=body.model_dump(exclude_none=True))
        return PayloadStoragePublic.model_validate(r.json())

    # --- rollouts --------------------------------------------------------------------------
    def start_rollout(self, plan: RolloutCreate) -> RolloutPublic:
        r = self._request("POST", "/api/v1/rollouts", json=plan.model_dump(mode="json", exclude_none=True))
        return RolloutPublic.model_validate(r.json())

    def list_rollouts(self, state: str | None = None) -> RolloutsPublic:
        params = {"state": state} if state else {}
        return RolloutsPublic.model_validate(self._request("GET", "/api/v1/rollouts", params=params).json())

    def get_rollout(self, rollout_id: int) -> RolloutPublic:
        return RolloutPublic.model_validate(self._request("GET", f"/api/v1/rollouts/{rollout_id}").json())

    def rollout_action(self, rollout_id: int, action: str, reason: str = "") -> RolloutPublic:
        """``action``: promote, pause, resume or rollback."""
        r = self._request("POST", f"/api/v1/rollouts/{rollout_id}/{action}", json={"reason": reason})
        return RolloutPublic.model_validate(r.json())

    # --- federation ------------------------------------------------------------------------
    def start_federation(self, body: FedRoundCreate) -> FedRunPublic:
        r = self._request("POST", "/api/v1/federation/rounds", json=body.model_dump(mode="json", exclude_none=True))
        return FedRunPublic.model_validate(r.json())

    def list_federation_runs(self, model: str | None = None, status: str | None = None) -> FedRunsPublic:
        r = self._request("GET", "/api/v1/federation/rounds", params=_query({"model": model, "status": status}))
        return FedRunsPublic.model_validate(r.json())

    def get_federation_run(self, run_id: int) -> FedRunPublic:
        return FedRunPublic.model_validate(self._request("GET", f"/api/v1/federation/rounds/{run_id}").json())

    def cancel_federation_run(self, run_id: int) -> FedRunPublic:
        return FedRunPublic.model_validate(self._request("POST", f"/api/v1/federation/rounds/{run_id}/cancel").json())

    def create_schedule(self, body: FedScheduleCreate) -> FedSchedulePublic:
        r = self._request("POST", "/api/v1/federation/schedules", json=body.model_dump(mode="json", exclude_none=True))
        return FedSchedulePublic.model_validate(r.json())

    def list_schedules(self) -> FedSchedulesPublic:
        return FedSchedulesPublic.model_validate(self._request("GET", "/api/v1/federation/schedules").json())

    def set_schedule_enabled(self, schedule_id: int, enabled: bool) -> FedSchedulePublic:
        r = self._request("PATCH", f"/api/v1/federation/schedules/{schedule_id}", json={"enabled": enabled})
        return FedSchedulePublic.model_validate(r.json())

    def delete_schedule(self, schedule_id: int) -> None:
        self._request("DELETE", f"/api/v1/federation/schedules/{schedule_id}")

    def put_source_checkpoint(self, name: str, version: str, path: Path) -> None:
        """Upload the PyTorch checkpoint an edge version was compressed from (federation trains it)."""
        self._request("PUT", f"/api/v1/federation/sources/{name}/{version}", content=Path(path).read_bytes(),
                      headers={"Content-Type": CHECKPOINT_CONTENT_TYPE})

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


def _query(filters: dict[str, object]) -> dict[str, str]:
    """Query parameters for the given filters: None is left out, booleans and times as the API reads them."""
    out: dict[str, str] = {}
    for key, value in filters.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif hasattr(value, "isoformat"):
            out[key] = value.isoformat()  # type: ignore[union-attr]
        else:
            out[key] = str(value)
    return out
