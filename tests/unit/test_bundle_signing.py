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
    SignatureError,
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


def test_verify_key_agrees_with_cryptography(keys, tmp_path: Path) -> None:
    import os

    from shared.bundle import key_id, load_verify_key, sign_manifest, verify_manifest
    from shared.bundle.ed25519 import InvalidSignature, openssl_available

    key, pub = keys
    light = load_verify_key(tmp_path / "k.pub")
    assert openssl_available()  # CPython's own libcrypto does the check here
    assert key_id(light) == key_id(pub)
    for n in (0, 1, 63, 1000):
        msg = os.urandom(n)
        sig = key.sign(msg)
        light.verify(sig, msg)
        for bad_sig, bad_msg in ((bytes([sig[0] ^ 1]) + sig[1:], msg), (sig, msg + b"x"), (sig[:-1], msg)):
            with pytest.raises(InvalidSignature):
                light.verify(bad_sig, bad_msg)
    signed = sign_manifest(_manifest(), key)
    assert verify_manifest(signed, [light]) is light
    other = generate_keypair(tmp_path / "o.pem", tmp_path / "o.pub")
    with pytest.raises(SignatureError, match="does not verify against any trusted key"):
        verify_manifest(sign_manifest(_manifest(), other), [light])


def test_verify_key_without_openssl_falls_back_to_cryptography(keys, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.bundle import ed25519, load_verify_key
    from shared.bundle.ed25519 import InvalidSignature

    monkeypatch.setattr(ed25519, "_probed", True)
    monkeypatch.setattr(ed25519, "_openssl", None)  # as on a platform where no libcrypto is found
    key, _ = keys
    light = load_verify_key(tmp_path / "k.pub")
    assert not ed25519.openssl_available()
    light.verify(key.sign(b"m"), b"m")
    with pytest.raises(InvalidSignature):
        light.verify(key.sign(b"m"), b"n")


@pytest.mark.parametrize("pem, problem", [
    (b"hello", "not a single"),
    (b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n", "not a single"),
    (b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n", "not an Ed25519 key"),
])
def test_verify_key_refuses_what_is_not_one_ed25519_pem(pem: bytes, problem: str) -> None:
    from shared.bundle import load_verify_key

    with pytest.raises(SignatureError, match=problem):
        load_verify_key(pem)


def test_verify_key_refuses_an_rsa_public_key() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from shared.bundle import load_verify_key

    pem = rsa.generate_private_key(65537, 1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        load_verify_key(pem)
