"""Fleet services on a real SQLite file and a real PostgreSQL database (every test runs on both): API
tokens, lineage, device filters, escalation statistics, payload storage, and the 0002 data migration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import select, text, update

from cloud_hub.db import Database
from cloud_hub.db.fleet import EscalationPayloadRow, EscalationStatRow
from cloud_hub.db.session import MIGRATIONS_DIR, make_engine, upgrade_to_head
from cloud_hub.devices import DeviceService, StatusUpdate
from cloud_hub.errors import InvalidInput, NotFound
from cloud_hub.escalations import EscalationStore, PayloadPolicy, minute_of
from cloud_hub.gateway.activity import DeviceActivity
from cloud_hub.registry import ArtifactStore, RegistryService, TrustedKeys
from cloud_hub.security import hash_token
from cloud_hub.tokens import TokenService
from shared.bundle import pack_bundle
from shared.messages import EscalationRequest, encode_request
from tests.hub_fixtures import HubModels, build_cloud_checkpoint

pytest_plugins = ["tests.hub_fixtures", "tests.postgres_fixtures"]


@pytest.fixture
def registry(db: Database, tmp_path: Path, hub_models: HubModels) -> RegistryService:
    keys = TrustedKeys((hub_models.public_key_path,), tmp_path / "keys")
    return RegistryService(db, ArtifactStore(tmp_path / "artifacts"), keys)


@pytest.fixture
def devices(db: Database, registry: RegistryService) -> DeviceService:
    return DeviceService(db, registry, default_model_name="t-edge")


def _req(device: str, version: str, region: str = "", n: int = 0) -> EscalationRequest:
    return EscalationRequest(
        request_id=f"{device}-{version}-{n}", device_id=device, region=region, task="t",
        model_name="t-edge", model_version=version,
    )


# --- tokens ----------------------------------------------------------------------------------------
def test_tokens_create_authenticate_list_rotate_and_revoke(db: Database, devices: DeviceService) -> None:
    tokens = TokenService(db)
    _, registration = devices.register("cam-1", "north")
    reg_id = tokens.list(device_id="cam-1")[0][0].id
    admin, admin_secret = tokens.create("ops laptop", "admin")
    assert admin.role == "admin" and admin.revoked_at is None
    p = tokens.authenticate(admin_secret)
    assert p is not None and p.is_admin and p.token_id == admin.id
    p = tokens.authenticate(registration)
    assert p is not None and (p.kind, p.device_id) == ("device", "cam-1")
    assert tokens.list(role="admin")[0][0].last_used_at is not None  # recorded on use

    # Only hashes are stored; lists never carry secrets.
    with db.session() as s:
        stored = set(s.scalars(text("SELECT token_hash FROM api_tokens")).all())
    assert stored == {hash_token(admin_secret), hash_token(registration)}
    listed, count = tokens.list()
    assert count == 2 and all(not hasattr(t, "token") for t in listed)

    # Rotation: the successor works, the old one stops at once; revoking again changes nothing.
    rotated, new_secret = tokens.rotate(reg_id)
    assert (rotated.device_id, rotated.name) == ("cam-1", "registration") and new_secret != registration
    assert tokens.authenticate(registration) is None
    assert devices.authenticate(new_secret) == "cam-1"
    revoked = tokens.revoke(rotated.id)
    assert revoked.revoked_at is not None and tokens.revoke(rotated.id).revoked_at == revoked.revoked_at
    assert tokens.authenticate(new_secret) is None
    with pytest.raises(InvalidInput, match="is revoked"):
        tokens.rotate(rotated.id)

    # replace=True revokes the device's other live tokens in the same transaction.
    _, a = tokens.create("spare", "device", "cam-1")
    _, b = tokens.create("fresh", "device", "cam-1", replace=True)
    assert tokens.authenticate(a) is None and devices.authenticate(b) == "cam-1"
    assert tokens.list(device_id="cam-1", active=True)[1] == 1
    assert tokens.list(active=False)[1] == 3
    assert devices.authenticate(admin_secret) is None  # an admin token is no device's token

    for call, err, needle in (
        (lambda: tokens.create("x", "device", "nope"), NotFound, "no device 'nope'"),
        (lambda: tokens.create("x", "device"), InvalidInput, "needs device_id"),
        (lambda: tokens.create("x", "admin", "cam-1"), InvalidInput, "belongs to no device"),
        (lambda: tokens.revoke(9999), NotFound, "no token with id 9999"),
    ):
        with pytest.raises(err, match=needle):
            call()
    assert tokens.list()[1] == 5  # admin, registration, its rotation, spare, fresh: failed calls added none


def test_values_the_database_refuses_are_bad_input(db: Database, db_url: str, devices: DeviceService) -> None:
    tokens = TokenService(db)
    if db_url.startswith("postgresql"):  # PostgreSQL text cannot hold NUL; SQLite stores it
        with pytest.raises(InvalidInput, match="the database refused a value"):
            tokens.list(device_id="a\x00b")
        with pytest.raises(InvalidInput, match="the database refused a value"):
            devices.register("ok-id", region="north\x00")
        assert devices.list() == ([], 0)
    else:
        assert tokens.list(device_id="a\x00b") == ([], 0)
        devices.register("ok-id", region="north\x00")
        assert devices.get("ok-id").region == "north\x00"


def test_migration_0002_moves_registration_tokens_into_api_tokens(db_url: str) -> None:
    engine = make_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            text(
                "INSERT INTO devices (device_id, region, model_name, token_hash, registered_at, online, escalations) "
                "VALUES ('old-1', 'west', 't-edge', :h, :t, false, 4)"
            ),
            {"h": hash_token("old-secret"), "t": datetime(2026, 1, 1)},
        )
    upgrade_to_head(engine)
    engine.dispose()
    database = Database(db_url).open()
    try:
        p = TokenService(database).authenticate("old-secret")
        assert p is not None and (p.kind, p.device_id) == ("device", "old-1")
        assert TokenService(database).list()[0][0].name == "registration"
    finally:
        database.close()


# --- lineage ---------------------------------------------------------------------------------------
def test_lineage_is_recorded_and_walked_back_to_the_root(
    registry: RegistryService, hub_models: HubModels, tmp_path: Path
) -> None:
    registry.register_bundle(hub_models.bundle_archive)  # t-edge:1, the root
    fed = {"federation_run_id": "run-7", "round": 3, "strategy": "fedavg", "regions": ["north", "south"]}
    v2 = registry.register_bundle(
        pack_bundle(hub_models.make_bundle("2", tmp_path / "2", parent_version="1").path), lineage=fed
    )
    assert v2.lineage == fed and registry.get_version("t-edge", "2").lineage == fed
    registry.register_bundle(pack_bundle(hub_models.make_bundle("3", tmp_path / "3", parent_version="2").path))
    chain, missing = registry.lineage_chain("t-edge", "3")
    assert [v.version for v in chain] == ["3", "2", "1"] and missing is None
    assert [v.version for v in registry.list_versions("t-edge", parent_version="1")[0]] == ["2"]

    orphan = registry.register_bundle(
        pack_bundle(hub_models.make_bundle("9", tmp_path / "9", parent_version="8").path)
    )
    assert registry.lineage_chain("t-edge", orphan.version) == ([orphan], "t-edge:8")

    # A cloud checkpoint from a federated round, whose parent is an edge version (another model).
    ckpt = build_cloud_checkpoint(tmp_path / "c.pt", name="t-cloud", version="r3", parent_version="3")
    cloud = registry.register_checkpoint(ckpt.read_bytes(), lineage={**fed, "parent_model": "t-edge"})
    chain, missing = registry.lineage_chain("t-cloud", "r3")
    assert [f"{v.name}:{v.version}" for v in chain] == ["t-cloud:r3", "t-edge:3", "t-edge:2", "t-edge:1"]
    assert cloud.lineage is not None and cloud.lineage["round"] == 3 and missing is None

    for bad, needle in (([1, 2], "must be a JSON object"), ({"x": object()}, "not JSON-serialisable")):
        with pytest.raises(InvalidInput, match=needle):
            registry.register_checkpoint(ckpt.read_bytes(), lineage=bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        registry.lineage_chain("t-edge", "77")
    assert registry.list_versions("t-cloud")[1] == 1


# --- devices ---------------------------------------------------------------------------------------
def test_devices_are_filtered_and_paged(
    devices: DeviceService, registry: RegistryService, hub_models: HubModels
) -> None:
    registry.register_bundle(hub_models.bundle_archive)
    for i in range(5):
        devices.register(f"d-{i}", "north" if i % 2 == 0 else "south")
    devices.register("o-1", "north", model_name="other")
    devices.report_running("d-0", "t-edge", "1")
    devices.assign("d-2", "1")
    now = datetime.now(UTC)
    devices.apply_activity({}, {"d-1": StatusUpdate(True, now), "d-2": StatusUpdate(True, now)})

    def ids(**kw: object) -> tuple[list[str], int]:
        page, total = devices.list(**kw)  # type: ignore[arg-type]
        return [d.device_id for d in page], total

    assert ids(region="north") == (["d-0", "d-2", "d-4", "o-1"], 4)
    assert ids(region="north", limit=2, offset=1) == (["d-2", "d-4"], 4)
    assert ids(online=True) == (["d-1", "d-2"], 2)
    assert ids(online=False, region="south") == (["d-3"], 1)
    assert ids(model_name="other") == (["o-1"], 1)
    assert ids(running_version="1") == (["d-0"], 1)
    assert ids(assigned_version="1", online=True) == (["d-2"], 1)
    assert ids(region="nowhere") == ([], 0)


# --- escalation statistics and payloads ------------------------------------------------------------
def test_escalation_stats_per_device_region_and_version(db: Database, devices: DeviceService) -> None:
    devices.register("s-1", "north")  # registered region wins over what the request says
    store = EscalationStore(db, PayloadPolicy(False, 3600, 100))
    activity = DeviceActivity(devices, escalations=store)
    for n in range(3):
        activity.answered(_req("s-1", "1", "typo-region", n), latency_ms=10.0 + n)
    activity.answered(_req("s-2", "2", "south"), latency_ms=4.0)
    activity.failed("s-2", _req("s-2", "2", "south"))
    activity.failed("s-3")  # did not decode: no version known
    activity.flush()
    activity.answered(_req("s-1", "1", "north", 9), latency_ms=14.0)  # adds into the same minute
    activity.flush()

    by_device = {r.device_id: r for r in store.stats("device")[0]}
    assert set(by_device) == {"s-1", "s-2", "s-3"}
    s1 = by_device["s-1"]
    assert (s1.escalations, s1.answered, s1.errors, s1.mean_latency_ms) == (4, 4, 0, 11.75)
    assert s1.model_version is None and s1.first_minute.tzinfo is not None
    s2 = by_device["s-2"]
    assert (s2.escalations, s2.errors, s2.error_rate, s2.mean_latency_ms) == (2, 1, 0.5, 4.0)
    assert by_device["s-3"].mean_latency_ms is None

    by_region = {r.region: r.escalations for r in store.stats("region")[0]}
    assert by_region == {"north": 4, "south": 2, "": 1}
    by_version = {(r.model_name, r.model_version): r.escalations for r in store.stats("model_version")[0]}
    assert by_version == {("t-edge", "1"): 4, ("t-edge", "2"): 2, ("", ""): 1}

    rows, total = store.stats("device", model_version="2")
    assert total == 1 and rows[0].device_id == "s-2"
    assert store.stats("device", limit=1, offset=1)[0][0].device_id == "s-2"
    now = datetime.now(UTC)
    assert store.stats("device", since=now - timedelta(minutes=2))[1] == 3
    assert store.stats("device", since=now + timedelta(minutes=2)) == ([], 0)
    assert store.stats("device", until=now - timedelta(minutes=2)) == ([], 0)
    with pytest.raises(InvalidInput, match="must be before until"):
        store.stats("device", since=now, until=now - timedelta(minutes=1))

    # Statistics older than the retention (30 days by default) are pruned.
    with db.session() as s:
        s.execute(
            update(EscalationStatRow)
            .where(EscalationStatRow.device_id == "s-3")
            .values(bucket=minute_of(now - timedelta(days=31)))
        )
    store.prune(store.default_policy)
    assert {r.device_id for r in store.stats("device")[0]} == {"s-1", "s-2"}


def test_payloads_are_stored_only_while_enabled_and_pruned(db: Database, devices: DeviceService) -> None:
    store = EscalationStore(db, PayloadPolicy(False, 3600, 100))
    activity = DeviceActivity(devices, escalations=store)
    activity.start()
    activity.stop()  # reads the policy at start; stop flushes once
    payload = encode_request(_req("p-1", "1"), np.ones((1, 1, 4, 4), np.float32))
    activity.answered(_req("p-1", "1"), 1.0, payload, label=1, confidence=0.9)
    activity.flush()
    assert store.count_payloads() == 0  # off: nothing stored

    policy = store.set_policy(True, None, 3)
    assert (policy.enabled, policy.retention_s, policy.max_rows) == (True, 3600, 3)
    assert store.policy() == policy  # kept in the database, for every hub on it
    activity.apply_policy(policy)
    for n in range(5):
        activity.answered(_req("p-1", "1", n=n), 1.0, payload, label=1, confidence=0.9)
    activity.flush()
    listed, count = store.list_payloads(device_id="p-1")
    assert count == 5 and listed[0].request_id == "p-1-1-4" and listed[0].cloud_label == 1
    assert store.payload(listed[0].id) == payload and listed[0].size_bytes == len(payload)

    assert store.prune(policy) == 2 and store.count_payloads() == 3  # max_rows keeps the newest
    with db.session() as s:
        s.execute(update(EscalationPayloadRow).values(received_at=datetime.now(UTC) - timedelta(hours=2)))
    assert store.prune(policy) == 3 and store.count_payloads() == 0  # older than the retention

    activity.apply_policy(store.set_policy(False, None, None))
    activity.answered(_req("p-1", "1", n=7), 1.0, payload)
    activity.flush()
    assert store.count_payloads() == 0
    with pytest.raises(NotFound, match="no stored escalation payload"):
        store.payload(12345)
    with pytest.raises(InvalidInput, match="retention must be > 0"):
        store.set_policy(True, 0, None)
    assert store.policy().enabled is False
    with db.session() as s:
        assert s.scalar(select(EscalationPayloadRow.id)) is None
