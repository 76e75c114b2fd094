"""Bundle manifests, Ed25519 signatures, and verified loading."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from shared.bundle import (
    BundleError,
    InputSpec,
    Manifest,
    canonical_bytes,
    generate_keypair,
    load_public_key,
    open_bundle,
    pack_bundle,
    unpack_bundle,
    write_bundle,
)


def _manifest(**kw) -> Manifest:
    base = dict(name="m", version="1", task="t", created_at="2026-01-01T00:00:00Z",
                input=InputSpec(shape=[1, 1, 8, 8]), labels=["a", "b"], model_sha256="0" * 64, model_size_bytes=0)
    base.update(kw)
    return Manifest(**base)


@pytest.fixture
def keys(tmp_path: Path):
    key = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    return key, load_public_key(tmp_path / "k.pub")


@pytest.fixture
def bundle_dir(tmp_path: Path, keys) -> Path:
    model = tmp_path / "src.onnx"
    model.write_bytes(b"not really onnx but bytes to hash" * 10)
    write_bundle(tmp_path / "b", model, _manifest(), keys[0])
    return tmp_path / "b"


def test_written_bundle_verifies(bundle_dir: Path, keys) -> None:
    vb = open_bundle(bundle_dir, [keys[1]])
    assert vb.manifest.model_size_bytes == 330
    assert vb.manifest.signature and vb.manifest.key_id


def test_canonical_bytes_ignore_signature_and_are_sorted() -> None:
    m = _manifest()
    assert canonical_bytes(m) == canonical_bytes(m.model_copy(update={"signature": "x"}))
    body = json.loads(canonical_bytes(m))
    assert list(body) == sorted(body)


def test_tampered_model_file_refused(bundle_dir: Path, keys) -> None:
    data = bytearray((bundle_dir / "model.onnx").read_bytes())
    data[5] ^= 0xFF
    (bundle_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256.*altered"):
        open_bundle(bundle_dir, [keys[1]])


def test_tampered_manifest_refused(bundle_dir: Path, keys) -> None:
    path = bundle_dir / "manifest.json"
    body = json.loads(path.read_text())
    body["labels"] = ["b", "a"]
    path.write_text(json.dumps(body))
    with pytest.raises(BundleError, match="does not verify"):
        open_bundle(bundle_dir, [keys[1]])


def test_untrusted_key_refused(bundle_dir: Path, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "o.pem", tmp_path / "o.pub")
    with pytest.raises(BundleError, match="does not verify"):
        open_bundle(bundle_dir, [load_public_key(tmp_path / "o.pub")])


def test_unsigned_refused(bundle_dir: Path, keys) -> None:
    path = bundle_dir / "manifest.json"
    body = json.loads(path.read_text())
    body["signature"] = None
    path.write_text(json.dumps(body))
    with pytest.raises(BundleError, match="not signed"):
        open_bundle(bundle_dir, [keys[1]])


def test_invalid_manifest_named(bundle_dir: Path, keys) -> None:
    (bundle_dir / "manifest.json").write_text('{"name": "m"}')
    with pytest.raises(BundleError, match="not a valid manifest"):
        open_bundle(bundle_dir, [keys[1]])


def test_pack_unpack_round_trip(bundle_dir: Path, keys, tmp_path: Path) -> None:
    out = unpack_bundle(pack_bundle(bundle_dir), tmp_path / "u")
    assert open_bundle(out, [keys[1]]).manifest.version == "1"


def test_archive_with_path_traversal_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(BundleError, match="not a plain top-level file"):
        unpack_bundle(buf.getvalue(), tmp_path / "u")
    assert not (tmp_path / "u").exists() and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("data", [b"garbage", b"\x1f\x8bgarbage", b"\x1f\x8b\x08\x00" + bytes(40)])
def test_garbage_archive_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(BundleError, match="not a readable tar.gz"):
        unpack_bundle(data, tmp_path / "u")
