"""The hub as a process: readiness, a generated admin token, restarts that keep the registry, SIGTERM."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest

from shared.broker import DevBroker
from shared.bundle import load_public_key, open_bundle, unpack_bundle
from shared.processes import free_port
from tests.hub_fixtures import HubModels, HubProcess

pytest_plugins = ["tests.hub_fixtures"]
pytestmark = pytest.mark.integration


def _readyz(proc: HubProcess) -> httpx.Response:
    return httpx.get(f"{proc.base_url}/readyz", timeout=10)


def test_readyz_says_what_is_missing_until_broker_and_cloud_model_are_there(
    hub_models: HubModels, tmp_path: Path
) -> None:
    broker_port = free_port()
    proc = HubProcess(
        tmp_path / "hub",
        f"mqtt://127.0.0.1:{broker_port}",
        generate_admin_token=True,
        public_keys=[hub_models.public_key_path],
    )
    broker = DevBroker("127.0.0.1", broker_port, tmp_path / "broker")
    with proc:
        r = _readyz(proc)
        assert r.status_code == 503
        body = r.json()
        assert body["missing"] == ["broker", "cloud_model"]
        assert f"no connection to broker mqtt://127.0.0.1:{broker_port}" in body["detail"]
        assert httpx.get(f"{proc.base_url}/healthz", timeout=10).status_code == 200

        # No --admin-token: the hub generated one, readable only by its user.
        token_file = proc.data_dir / "admin.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        with proc.client() as client:
            client.push_checkpoint(hub_models.checkpoint_path)
        r = _readyz(proc)
        assert r.status_code == 503 and r.json()["missing"] == ["broker"]

        broker.start()
        try:
            proc.wait_ready(30)
            body = _readyz(proc).json()
            assert body["ready"] and body["models"] == {"t": "t-cloud:1"}
        finally:
            broker.stop()


def test_restart_keeps_models_devices_and_artifacts(hub: HubProcess, hub_models: HubModels) -> None:
    with hub.client() as admin:
        token = admin.register_device("keep-1", "north").token
        before = admin.list_models()
    code = hub.stop()
    assert code == 0, f"hub did not exit cleanly on SIGTERM (exit {code})\n{hub.log_tail()}"
    assert "inference, broker connection and database closed" in hub.log_tail(20)

    # A long warm-up (many passes per batch size) keeps the reloaded model loading for a while:
    # meanwhile the hub is alive (healthz) but not ready, and readyz says why.
    hub.extra_args += ["--warmup-batches", "100", "--max-batch-size", "64"]
    hub.start()
    during = _readyz(hub)
    assert httpx.get(f"{hub.base_url}/healthz", timeout=10).status_code == 200
    assert during.status_code == 503, during.text
    assert "cloud_model" in during.json()["missing"]
    assert "still loading (warm-up)" in during.json()["detail"]
    hub.wait_ready(60)  # the cloud model is reloaded from the registry, nothing pushed again
    with hub.client() as admin:
        assert admin.list_models() == before
        assert admin.get_device("keep-1").region == "north"
    with hub.client(token) as device:
        assignment = device.get_assignment("keep-1")
        archive = device.download_artifact(assignment.model_name, assignment.version)
    bundle = open_bundle(
        unpack_bundle(archive, hub.data_dir.parent / "check"), [load_public_key(hub_models.public_key_path)]
    )
    assert bundle.manifest.name == hub_models.edge_name
    assert bundle.manifest.model_sha256 == assignment.sha256
