"""The agent's bundle store: verified install, tampered archives refused, what to serve from disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_agent.bundles import BundleStore, TrustError, load_trusted_keys, parse_public_keys
from shared.api_schemas import AssignmentPublic
from shared.bundle import MANIFEST_FILE, BundleError, VerifiedBundle, generate_keypair, pack_bundle
from shared.hub_client import HubClient
from tests.agent_fixtures import SigningKeys, make_bundle

pytest_plugins = ["tests.agent_fixtures"]


@pytest.fixture
def store(tmp_path: Path, signing_keys: SigningKeys) -> BundleStore:
    return BundleStore(tmp_path / "agent" / "bundles", parse_public_keys(signing_keys.public_pem, "test"))


def _tampered_copy(
    bundle: VerifiedBundle,
    tmp_path: Path,
    *,
    model_byte: bool = False,
    manifest_update: dict[str, object] | None = None,
) -> bytes:
    copy = tmp_path / f"tampered-{model_byte}-{bool(manifest_update)}"
    shutil.copytree(bundle.path, copy)
    if model_byte:
        model = copy / "model.onnx"
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
    if manifest_update:
        m = json.loads((copy / MANIFEST_FILE).read_text())
        m.update(manifest_update)
        (copy / MANIFEST_FILE).write_text(json.dumps(m))
    return pack_bundle(copy)


def test_install_verifies_and_places_the_bundle(store: BundleStore, bundle_v1: VerifiedBundle) -> None:
    installed = store.install(pack_bundle(bundle_v1.path))
    assert installed.path == store.root / "tiny-1.0.0"
    assert installed.manifest == bundle_v1.manifest
    assert [p.name for p in store.root.iterdir()] == ["tiny-1.0.0"]  # no staging left behind


def test_flipped_model_byte_is_refused_naming_the_hash(
    store: BundleStore, bundle_v1: VerifiedBundle, tmp_path: Path
) -> None:
    store.install(pack_bundle(bundle_v1.path))
    before = (store.root / "tiny-1.0.0" / "model.onnx").read_bytes()
    with pytest.raises(BundleError, match=r"SHA-256 of model.onnx .* the model file was altered"):
        store.install(_tampered_copy(bundle_v1, tmp_path, model_byte=True))
    # The verified copy of the same version is untouched and still verifies.
    assert (store.root / "tiny-1.0.0" / "model.onnx").read_bytes() == before
    assert store.open_existing("tiny", "1.0.0") is not None
    assert sorted(p.name for p in store.root.iterdir()) == ["tiny-1.0.0"]


@pytest.mark.parametrize("update", [{"labels": ["ok", "broken"]}, {"version": "6.6.6"}, {"task": "other"}])
def test_edited_manifest_field_is_refused_naming_the_signature(
    store: BundleStore, bundle_v1: VerifiedBundle, tmp_path: Path, update: dict[str, object]
) -> None:
    with pytest.raises(BundleError, match="signature of bundle .* does not verify against any trusted key"):
        store.install(_tampered_copy(bundle_v1, tmp_path, manifest_update=update))
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_bundle_signed_by_an_untrusted_key_is_refused(store: BundleStore, tmp_path: Path) -> None:
    other = generate_keypair(tmp_path / "o.pem", tmp_path / "o.pub")
    foreign = make_bundle(tmp_path / "foreign" / "tiny-2", other, version="2")
    with pytest.raises(BundleError, match="does not verify against any trusted key"):
        store.install(pack_bundle(foreign.path))


def test_install_checks_the_assignment(store: BundleStore, bundle_v1: VerifiedBundle) -> None:
    archive = pack_bundle(bundle_v1.path)
    good = AssignmentPublic(device_id="d", model_name="tiny", version="1.0.0", sha256=bundle_v1.manifest.model_sha256)
    assert store.install(archive, good).manifest.version == "1.0.0"
    with pytest.raises(BundleError, match="hub assigned tiny:2.0.0 but the downloaded bundle is tiny:1.0.0"):
        store.install(archive, good.model_copy(update={"version": "2.0.0"}))
    with pytest.raises(BundleError, match="does not match the hub's assignment"):
        store.install(archive, good.model_copy(update={"sha256": "f" * 64}))


def test_not_an_archive_is_refused(store: BundleStore) -> None:
    with pytest.raises(BundleError, match="not a readable tar.gz"):
        store.install(b"<html>proxy error</html>")


def test_best_local_prefers_the_last_activated_then_the_newest(
    store: BundleStore, signing_keys: SigningKeys, tmp_path: Path
) -> None:
    assert store.best_local() is None
    old = store.install(
        pack_bundle(
            make_bundle(
                tmp_path / "m" / "a",
                signing_keys.private,
                version="1",
                created_at="2025-01-01T00:00:00+00:00",
            ).path
        )
    )
    new = store.install(
        pack_bundle(
            make_bundle(
                tmp_path / "m" / "b",
                signing_keys.private,
                version="2",
                created_at="2025-02-01T00:00:00+00:00",
            ).path
        )
    )
    assert store.best_local().manifest.version == "2"  # type: ignore[union-attr]
    store.mark_current(old)
    assert store.best_local().manifest.version == "1"  # type: ignore[union-attr]
    assert store.best_local(model_name="other") is None
    # A stored bundle altered on disk is skipped, never served.
    model = new.path / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    store.mark_current(new)
    assert store.best_local().manifest.version == "1"  # type: ignore[union-attr]


def test_trusted_keys_from_file_or_pin(tmp_path: Path, signing_keys: SigningKeys) -> None:
    second = generate_keypair(tmp_path / "s.pem", tmp_path / "s.pub")
    both = tmp_path / "both.pem"
    both.write_bytes(signing_keys.public_pem + (tmp_path / "s.pub").read_bytes())
    unreachable = HubClient("http://127.0.0.1:9", timeout=1)
    keys = load_trusted_keys(both, tmp_path / "pin.pem", unreachable)
    assert len(keys) == 2 and keys[1].public_bytes_raw() == second.public_key().public_bytes_raw()
    pin = tmp_path / "pin.pem"
    pin.write_bytes(signing_keys.public_pem)
    assert len(load_trusted_keys(None, pin, unreachable)) == 1
    with pytest.raises(TrustError, match="no --trusted-key given, no pinned keys .* cannot verify any bundle"):
        load_trusted_keys(None, tmp_path / "nothing.pem", unreachable)
    with pytest.raises(TrustError, match="cannot read trusted key"):
        load_trusted_keys(tmp_path / "missing.pem", pin, unreachable)
    with pytest.raises(TrustError, match="holds no PEM public key"):
        parse_public_keys(b"hello", "x.pem")
