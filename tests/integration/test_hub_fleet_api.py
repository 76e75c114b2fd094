"""Fleet API on a real hub process, once on SQLite and once on PostgreSQL (``--db-url``): API tokens
(create, use, rotate, revoke, CLI), paged and filtered lists, lineage, escalation statistics after
real escalations over the real broker, and raw payload storage switched off and on."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cloud_hub.token_cli import token_app
from shared import topics
from shared.broker import DevBroker
from shared.bundle import pack_bundle
from shared.hub_client import HubError
from shared.messages import DeviceStatus, EscalationAnswer, EscalationRequest, decode_answer, encode_request
from shared.mqtt import Message, MqttClient
from tests.hub_fixtures import HubModels, HubProcess, start_hub_with_models

pytest_plugins = ["tests.hub_fixtures", "tests.postgres_fixtures"]
pytestmark = pytest.mark.integration

T = TypeVar("T")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet_hub(
    request: pytest.FixtureRequest,
    session_broker: DevBroker,
    hub_models: HubModels,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HubProcess]:
    extra = ["--warmup-batches", "0"]  # model warm-up is not what these tests are about
    if request.param == "postgresql":
        extra += ["--db-url", request.getfixturevalue("postgres").create_database()]
    proc = start_hub_with_models(
        tmp_path_factory.mktemp(f"fleet-{request.param}") / "hub", session_broker.url, hub_models, extra
    )
    try:
        yield proc
    finally:
        proc.stop()


class _Device:
    """A device on the real broker: sends escalations and waits for their answers."""

    def __init__(self, hub: HubProcess, device_id: str) -> None:
        self.device_id = device_id
        self._answers: queue.Queue[Message] = queue.Queue()
        self.client = MqttClient(hub.broker_url, f"test-{device_id}-{uuid.uuid4().hex[:6]}")
        self.client.subscribe(topics.answer(device_id), self._answers.put, qos=1)
        self.client.start()
        self.sent: list[bytes] = []

    def request(self, version: str, n: int, region: str = "") -> bytes:
        req = EscalationRequest(
            request_id=f"{self.device_id}-{n}", device_id=self.device_id, region=region, task="t",
            model_name="t-edge", model_version=version,
        )
        x = np.random.default_rng(n).standard_normal((1, 1, 32, 32)).astype(np.float32)
        return encode_request(req, x)

    def escalate(self, payload: bytes, corr: str, timeout: float = 15.0) -> EscalationAnswer:
        self.sent.append(payload)
        self.client.publish(
            topics.escalate(self.device_id), payload, qos=1,
            response_topic=topics.answer(self.device_id), correlation_data=corr.encode(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self._answers.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if msg.correlation_data == corr.encode():
                return decode_answer(msg.payload)[0]
        raise AssertionError(f"no answer for {corr} within {timeout} s")

    def status(self, state: str) -> None:
        body = DeviceStatus(device_id=self.device_id, state=state).model_dump_json().encode()  # type: ignore[arg-type]
        self.client.publish(topics.PREFIX + f"/{self.device_id}/status", body, qos=1, retain=True)

    def close(self) -> None:
        self.client.publish(topics.PREFIX + f"/{self.device_id}/status", b"", qos=1, retain=True)
        self.client.stop()


def _until(fn: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Poll ``fn`` until ``ok`` holds (the hub writes activity once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


# --- tokens ----------------------------------------------------------------------------------------
def test_tokens_are_created_used_rotated_and_revoked(fleet_hub: HubProcess) -> None:
    with fleet_hub.client() as boot:
        ci = boot.create_token("ci", "admin")
    with fleet_hub.client(ci.token) as admin:
        registration = admin.register_device("tok-dev-1", "north").token
        extra = admin.create_token("spare", "device", "tok-dev-1")
        listed = admin.list_tokens(device_id="tok-dev-1")
        assert [(t.name, t.role) for t in listed.data] == [("registration", "device"), ("spare", "device")]
        reg_id = listed.data[0].id
    with fleet_hub.http() as http:  # secrets never appear in lists
        body = http.get("/api/v1/tokens").json()
        assert body["count"] >= 3 and all("token" not in t for t in body["data"])
        assert ci.token not in json.dumps(body)

    for secret in (registration, extra.token):
        with fleet_hub.client(secret) as device:
            assert device.download_artifact("t-edge", "1")[:2] == b"\x1f\x8b"
            with pytest.raises(HubError) as info:
                device.create_token("evil", "admin")
            assert info.value.status == 403

    with fleet_hub.client() as boot:
        assert boot.revoke_token(extra.id).revoked_at is not None
        rotated = boot.rotate_token(reg_id)
        assert (rotated.device_id, rotated.name) == ("tok-dev-1", "registration")
    for gone in (extra.token, registration):
        with fleet_hub.http(gone) as http:
            r = http.get("/api/v1/devices/tok-dev-1")
            assert r.status_code == 401 and "revoked" in r.json()["detail"]
    with fleet_hub.client(rotated.token) as device:
        assert device.get_device("tok-dev-1").region == "north"

    with fleet_hub.client() as boot:
        boot.revoke_token(ci.id)
        with fleet_hub.http(ci.token) as http:
            assert http.get("/api/v1/devices").status_code == 401
        assert boot.list_devices().count >= 1  # the bootstrap admin token keeps working
        for call, status, needle in (
            (lambda: boot.create_token("x", "device", "no-such-device"), 404, "no device 'no-such-device'"),
            (lambda: boot.create_token("x", "admin", "tok-dev-1"), 400, "belongs to no device"),
            (lambda: boot.revoke_token(999999), 404, "no token with id 999999"),
            (lambda: boot.revoke_token(2**40), 422, "token_id"),
            (lambda: boot._request("POST", "/api/v1/tokens", json={"name": "x", "role": "root"}), 422, "role"),
        ):
            with pytest.raises(HubError, match=needle) as info:
                call()
            assert info.value.status == status


def test_token_cli_create_list_revoke(fleet_hub: HubProcess) -> None:
    app = typer.Typer()
    app.add_typer(token_app, name="token")
    env = {"EDGEFED_HUB_URL": fleet_hub.base_url, "EDGEFED_ADMIN_TOKEN": fleet_hub.admin_token}
    runner = CliRunner()
    with fleet_hub.client() as admin:
        admin.register_device("tok-cli-1", "east")
    result = runner.invoke(app, ["token", "create", "cli dev", "--role", "device", "--device", "tok-cli-1"], env=env)
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[-1]
    with fleet_hub.client(secret) as device:
        assert device.get_device("tok-cli-1").region == "east"
    result = runner.invoke(app, ["token", "list", "--device", "tok-cli-1"], env=env)
    assert result.exit_code == 0 and "cli dev" in result.output and secret not in result.output
    token_id = next(line.split()[0] for line in result.output.splitlines() if "cli dev" in line)
    result = runner.invoke(app, ["token", "revoke", token_id], env=env)
    assert result.exit_code == 0 and "revoked" in result.output
    with fleet_hub.http(secret) as http:
        assert http.get("/api/v1/devices/tok-cli-1").status_code == 401
    result = runner.invoke(app, ["token", "create", "x", "--role", "root"], env=env)
    assert result.exit_code == 2 and "--role must be admin or device" in result.output
    result = runner.invoke(app, ["token", "list", "--admin-token", "wrong"], env=env)
    assert result.exit_code == 1 and "HTTP 401" in result.output


# --- lists and lineage -----------------------------------------------------------------------------
def test_device_and_version_lists_are_paged_and_filtered(
    fleet_hub: HubProcess, hub_models: HubModels, tmp_path: Path
) -> None:
    with fleet_hub.client() as admin:
        tokens = {f"flt-{i}": admin.register_device(f"flt-{i}", "flt-n" if i < 3 else "flt-s").token for i in range(5)}
        page = admin.list_devices(limit=2, region="flt-n")
        assert page.count == 3 and [d.device_id for d in page.data] == ["flt-0", "flt-1"]
        assert [d.device_id for d in admin.list_devices(limit=2, offset=2, region="flt-n").data] == ["flt-2"]
    with fleet_hub.client(tokens["flt-3"]) as device:
        device.report_running("flt-3", "t-edge", "1")
    dev = _Device(fleet_hub, "flt-4")
    try:
        dev.status("online")
        with fleet_hub.client() as admin:
            online = _until(lambda: admin.list_devices(region="flt-s", online=True), lambda p: p.count == 1)
            assert [d.device_id for d in online.data] == ["flt-4"] and online.data[0].last_seen is not None
            assert [d.device_id for d in admin.list_devices(region="flt-s", running_version="1").data] == ["flt-3"]
            assert admin.list_devices(region="flt-s", model="t-edge", online=False).count == 1
            dev.status("offline")
            assert _until(lambda: admin.list_devices(region="flt-s", online=False), lambda p: p.count == 2).count == 2
    finally:
        dev.close()

    with fleet_hub.client() as admin:
        admin.push_bundle(pack_bundle(hub_models.make_bundle("flt-2", tmp_path / "2", parent_version="1").path))
        admin.push_bundle(pack_bundle(hub_models.make_bundle("flt-3", tmp_path / "3", parent_version="flt-2").path))
        lineage = admin.lineage("t-edge", "flt-3")
        assert [v.version for v in lineage.data] == ["flt-3", "flt-2", "1"] and lineage.missing_parent is None
        versions = admin.list_versions("t-edge", limit=1)
        assert len(versions.data) == 1 and versions.count >= 3
        with fleet_hub.http() as http:
            r = http.get("/api/v1/models/t-edge/versions", params={"parent_version": "flt-2"})
            assert [v["version"] for v in r.json()["data"]] == ["flt-3"]
            assert [m["name"] for m in http.get("/api/v1/models", params={"kind": "cloud"}).json()["data"]] == [
                "t-cloud"
            ]
            r = http.get("/api/v1/devices", params={"region": "a\x00b"})
            if any(a.startswith("postgresql") for a in fleet_hub.argv()):  # PostgreSQL text cannot hold NUL
                assert r.status_code == 400 and "the database refused a value" in r.json()["detail"], r.text
            else:
                assert r.status_code == 200 and r.json()["count"] == 0, r.text
            r = http.get("/api/v1/escalations/stats", params={"since": "0001-01-01T00:00:00+05:00"})
            assert r.status_code == 400 and "out of range" in r.json()["detail"], r.text
            for path, params in (
                ("/api/v1/devices", {"online": "maybe"}),
                ("/api/v1/devices", {"limit": 0}),
                ("/api/v1/models", {"kind": "gpu"}),
            ):
                r = http.get(path, params=params)
                assert r.status_code == 422 and "invalid request" in r.json()["detail"], r.text


# --- escalation statistics and payloads ------------------------------------------------------------
def test_escalation_stats_count_real_escalations_per_device_region_and_version(fleet_hub: HubProcess) -> None:
    with fleet_hub.client() as admin:
        admin.register_device("st-1", "st-north")
        admin.register_device("st-2", "st-south")
    one, two = _Device(fleet_hub, "st-1"), _Device(fleet_hub, "st-2")
    try:
        for n in range(3):
            assert one.escalate(one.request("1", n), f"st-1-{n}").ok
        for n in range(2):
            assert two.escalate(two.request("st-v2", n), f"st-2-{n}").ok
        bad = two.escalate(b"not a frame", "st-2-bad")
        assert not bad.ok and bad.error_kind == "bad_payload"
    finally:
        one.close()
        two.close()

    with fleet_hub.client() as admin:
        stats = _until(
            lambda: admin.escalation_stats("device", region="st-south"),
            lambda s: sum(r.escalations for r in s.data) == 3,
        )
        (row,) = stats.data
        assert (row.device_id, row.escalations, row.answered, row.errors) == ("st-2", 3, 2, 1)
        assert row.mean_latency_ms is not None and row.mean_latency_ms > 0 and row.region is None
        by_region = admin.escalation_stats("region", region="st-north")
        assert [(r.region, r.escalations, r.errors) for r in by_region.data] == [("st-north", 3, 0)]
        by_version = admin.escalation_stats("model_version", device_id="st-2")
        assert {(r.model_name, r.model_version): r.escalations for r in by_version.data} == {
            ("", ""): 1,
            ("t-edge", "st-v2"): 2,
        }
        assert admin.escalation_stats("device", model_version="st-v2").data[0].device_id == "st-2"
        future = admin.escalation_stats("device", since="2999-01-01T00:00:00Z")
        assert future.count == 0 and future.data == []
        assert _until(lambda: admin.get_device("st-1"), lambda d: d.escalations == 3).escalations == 3
        with fleet_hub.http() as http:
            r = http.get("/api/v1/escalations/stats", params={"group_by": "planet"})
            assert r.status_code == 422 and "group_by" in r.json()["detail"]
            r = http.get("/api/v1/escalations/stats", params={"since": "2026-01-02", "until": "2026-01-01"})
            assert r.status_code == 400 and "must be before until" in r.json()["detail"]
        device_token = admin.create_token("st", "device", "st-1").token
    with fleet_hub.http(device_token) as http:
        assert http.get("/api/v1/escalations/stats").status_code == 403


def test_payloads_are_stored_only_while_an_admin_enables_it(fleet_hub: HubProcess) -> None:
    with fleet_hub.client() as admin:
        assert admin.payload_storage().enabled is False
        admin.register_device("pl-1", "pl")
        dev = _Device(fleet_hub, "pl-1")
        try:
            def answered() -> int:
                return sum(r.answered for r in admin.escalation_stats("device", device_id="pl-1").data)

            def stored() -> int:
                return int(admin._request("GET", "/api/v1/escalations/payloads", params={"device_id": "pl-1"})
                           .json()["count"])

            assert dev.escalate(dev.request("1", 0), "pl-0").ok
            assert _until(answered, lambda n: n == 1) == 1
            assert stored() == 0  # off: counted, but nothing stored

            on = admin.set_payload_storage(True, max_rows=50)
            assert (on.enabled, on.max_rows, on.retention_s) == (True, 50, 7 * 24 * 3600)
            for n in (1, 2):
                assert dev.escalate(dev.request("1", n), f"pl-{n}").ok
            assert _until(stored, lambda n: n == 2) == 2
            with fleet_hub.http() as http:
                listed = http.get("/api/v1/escalations/payloads", params={"device_id": "pl-1"}).json()["data"]
                assert [p["request_id"] for p in listed] == ["pl-1-2", "pl-1-1"]
                raw = http.get(f"/api/v1/escalations/payloads/{listed[0]['id']}")
                assert raw.content == dev.sent[2] and raw.headers["content-type"] == "application/octet-stream"

            assert admin.set_payload_storage(False).enabled is False
            assert dev.escalate(dev.request("1", 3), "pl-3").ok
            assert _until(answered, lambda n: n == 4) == 4
            time.sleep(0.5)
            assert stored() == 2  # off again: nothing new
        finally:
            dev.close()
        with fleet_hub.http() as http:
            assert http.delete("/api/v1/escalations/payloads").json()["stored"] == 0
            r = http.put("/api/v1/escalations/payload-storage", json={"enabled": True, "retention_s": -1})
            assert r.status_code == 422 and "retention_s" in r.json()["detail"]
        assert admin.payload_storage().enabled is False
