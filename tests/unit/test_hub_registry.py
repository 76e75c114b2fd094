"""The registry service and the device service against a real SQLite file and a real PostgreSQL database
(every test runs on both), with a real artifact directory."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from cloud_hub.db import Base, Database
from cloud_hub.devices import DeviceService, StatusUpdate
from cloud_hub.errors import Conflict, InvalidInput, NotFound
from cloud_hub.registry import ArtifactStore, RegistryService, TrustedKeys
from shared.bundle import generate_keypair, pack_bundle
from tests.hub_fixtures import HubModels, build_edge_bundle

pytest_plugins = ["tests.hub_fixtures", "tests.postgres_fixtures"]


@pytest.fixture
def registry(db: Database, tmp_path: Path, hub_models: HubModels) -> RegistryService:
    keys = TrustedKeys((hub_models.public_key_path,), tmp_path / "keys")
    return RegistryService(db, ArtifactStore(tmp_path / "artifacts"), keys)


def _versions_on_disk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_dir())


def _tampered_archive(hub_models: HubModels, tmp_path: Path) -> bytes:
    copy = tmp_path / "tampered"
    shutil.copytree(hub_models.bundle_dir, copy)
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return pack_bundle(copy)


def test_migrations_create_exactly_the_orm_schema(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_register_bundle_and_checkpoint_then_read_them_back(
    registry: RegistryService, hub_models: HubModels, tmp_path: Path
) -> None:
    archive = hub_models.bundle_archive
    edge = registry.register_bundle(archive)
    cloud = registry.register_checkpoint(hub_models.checkpoint_path.read_bytes())
    assert (edge.name, edge.version, edge.kind, edge.task) == ("t-edge", "1", "edge", "t")
    assert (cloud.name, cloud.version, cloud.kind) == ("t-cloud", "1", "cloud")
    assert edge.manifest["signature"] and edge.sha256 == edge.manifest["model_sha256"]
    assert edge.artifact_sha256 == hashlib.sha256(archive).hexdigest()
    assert (
        cloud.sha256
        == cloud.artifact_sha256
        == hashlib.sha256(hub_models.checkpoint_path.read_bytes()).hexdigest()
    )
    assert cloud.manifest["arch"] == "cloud-resnet"
    # The artifact is stored byte for byte, with its manifest next to it.
    stored = registry.artifact_file(registry.get_version("t-edge", "1"))
    assert stored.read_bytes() == archive and edge.size_bytes == len(archive)
    assert json.loads((stored.parent / "manifest.json").read_text())["name"] == "t-edge"
    models, count = registry.list_models()
    assert count == 2 and [(m.name, m.kind, m.latest_version, m.version_count) for m in models] == [
        ("t-cloud", "cloud", "1", 1),
        ("t-edge", "edge", "1", 1),
    ]
    assert [v.name for v in registry.latest_cloud_versions()] == ["t-cloud"]


def test_tampered_bundle_is_refused_naming_the_hash_and_leaves_nothing(
    registry: RegistryService, hub_models: HubModels, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="SHA-256 of model.onnx") as info:
        registry.register_bundle(_tampered_archive(hub_models, tmp_path))
    assert info.value.kind == "bad_bundle"
    assert registry.list_models() == ([], 0)
    assert _versions_on_disk(tmp_path / "artifacts") == []


def test_unsigned_untrusted_and_garbage_bundles_are_refused(
    registry: RegistryService, hub_models: HubModels, tmp_path: Path
) -> None:
    other_private, other_public = tmp_path / "other.pem", tmp_path / "other.pub"
    generate_keypair(other_private, other_public)
    foreign = build_edge_bundle(tmp_path / "foreign", hub_models.onnx_path, other_private, version="9")
    with pytest.raises(InvalidInput, match="does not verify against any trusted key"):
        registry.register_bundle(pack_bundle(foreign.path))

    unsigned_dir = tmp_path / "unsigned"
    shutil.copytree(hub_models.bundle_dir, unsigned_dir)
    manifest = json.loads((unsigned_dir / "manifest.json").read_text())
    manifest["signature"] = None
    (unsigned_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInput, match="is not signed"):
        registry.register_bundle(pack_bundle(unsigned_dir))

    with pytest.raises(InvalidInput, match="not a readable tar.gz"):
        registry.register_bundle(b"definitely not a tarball")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(InvalidInput, match="not a plain top-level file"):
        registry.register_bundle(buf.getvalue())
    assert registry.list_models() == ([], 0)

    # A key dropped into <data_dir>/keys is trusted on the next push, without a restart.
    (tmp_path / "keys").mkdir()
    shutil.copy(other_public, tmp_path / "keys" / "other.pub")
    assert registry.register_bundle(pack_bundle(foreign.path)).version == "9"


def test_duplicate_version_and_kind_or_task_clash_are_conflicts(
    registry: RegistryService, hub_models: HubModels, tmp_path: Path
) -> None:
    archive = hub_models.bundle_archive  # packed once: a gzip header carries the packing time
    first = registry.register_bundle(archive)
    again = hub_models.make_bundle("1", tmp_path / "again")  # same name and version, other bytes (time)
    with pytest.raises(Conflict, match="t-edge version 1 is already registered"):
        registry.register_bundle(pack_bundle(again.path))
    assert registry.get_version("t-edge", "1").sha256 == first.sha256
    assert registry.artifact_file(first).read_bytes() == archive

    clash = hub_models.make_bundle("1", tmp_path / "clash", name="t-cloud")
    registry.register_checkpoint(hub_models.checkpoint_path.read_bytes())
    with pytest.raises(Conflict, match="registered as a cloud model"):
        registry.register_bundle(pack_bundle(clash.path))
    other_task = hub_models.make_bundle("2", tmp_path / "task", task="other")
    with pytest.raises(Conflict, match="serves task 't'"):
        registry.register_bundle(pack_bundle(other_task.path))
    assert [v.version for v in registry.list_versions("t-edge")[0]] == ["1"]


def test_bad_checkpoints_are_refused(
    registry: RegistryService, hub_models: HubModels, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="not a readable edgefed checkpoint"):
        registry.register_checkpoint(b"\x00" * 100)
    with pytest.raises(InvalidInput, match="body is empty"):
        registry.register_checkpoint(b"")
    import torch

    from shared.models import CheckpointMeta, build_model, save_checkpoint

    meta = CheckpointMeta.model_validate(
        {**torch.load(hub_models.checkpoint_path, weights_only=True)["meta"], "role": "edge", "name": "e"}
    )
    save_checkpoint(
        tmp_path / "edge.pt", meta, build_model("cloud-resnet", in_channels=1, num_classes=2, width=8)
    )
    with pytest.raises(InvalidInput, match="role 'edge'"):
        registry.register_checkpoint((tmp_path / "edge.pt").read_bytes())
    assert registry.list_models() == ([], 0)


def test_versions_are_listed_newest_first_with_paging(
    registry: RegistryService, hub_models: HubModels, tmp_path: Path
) -> None:
    for v in ("1", "2", "3"):
        registry.register_bundle(pack_bundle(hub_models.make_bundle(v, tmp_path / v).path))
    page, total = registry.list_versions("t-edge", limit=2, offset=1)
    assert total == 3 and [v.version for v in page] == ["2", "1"]
    assert registry.latest_version("t-edge").version == "3"
    with pytest.raises(NotFound, match="no model named 'nope'"):
        registry.list_versions("nope")
    with pytest.raises(NotFound, match="has no version '7'"):
        registry.get_version("t-edge", "7")


def test_devices_register_authenticate_assign_and_record_activity(
    registry: RegistryService, db: Database, hub_models: HubModels, tmp_path: Path
) -> None:
    devices = DeviceService(db, registry, default_model_name="t-edge")
    info, token = devices.register("cam-1", "north")
    assert info.model_name == "t-edge" and not info.online and info.escalations == 0
    assert devices.authenticate(token) == "cam-1"
    assert devices.authenticate(token + "x") is None
    with pytest.raises(Conflict, match="already registered"):
        devices.register("cam-1")
    with pytest.raises(InvalidInput, match="device id 'a/b' is invalid"):
        devices.register("a/b")
    with pytest.raises(NotFound, match="has no registered version yet"):
        devices.assignment("cam-1")

    registry.register_bundle(hub_models.bundle_archive)
    registry.register_bundle(pack_bundle(hub_models.make_bundle("2", tmp_path / "2").path))
    assert devices.assignment("cam-1").version == "2"
    devices.assign("cam-1", "1")
    assert devices.assignment("cam-1").version == "1"
    with pytest.raises(NotFound):
        devices.assign("cam-1", "99")

    assert devices.report_running("cam-1", "t-edge", "1").running_version == "1"
    with pytest.raises(InvalidInput, match="registered for model 't-edge'"):
        devices.report_running("cam-1", "t-cloud", "1")
    with pytest.raises(NotFound):
        devices.report_running("cam-1", "t-edge", "99")

    from cloud_hub.db.models import utcnow

    devices.apply_activity({"cam-1": 3, "unknown": 5}, {})
    devices.apply_activity({"cam-1": 2}, {"cam-1": StatusUpdate(online=False, at=utcnow())})
    got = devices.get("cam-1")
    assert got.escalations == 5 and not got.online and got.last_seen is not None
    assert [d.device_id for d in devices.list()[0]] == ["cam-1"]
