"""Ed25519 keys and manifest signatures.

``cryptography`` is imported only by the functions that create, load or use private keys (the hub
and the factory). Verification accepts either cryptography's ``Ed25519PublicKey`` or the light
``shared.bundle.ed25519.VerifyKey`` (``load_verify_key``), which the edge agent uses so that its
serving process never imports ``cryptography`` (~7.5 MiB resident).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from shared.bundle.ed25519 import InvalidSignature, VerifyKey
from shared.bundle.manifest import Manifest, canonical_bytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    PublicKey: TypeAlias = Ed25519PublicKey | VerifyKey

__all__ = [
    "SignatureError",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "load_verify_key",
    "public_key_pem",
    "key_id",
    "sign_manifest",
    "verify_manifest",
]


class SignatureError(ValueError):
    """A manifest signature is missing, malformed or does not verify."""


def generate_keypair(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """Create a new key pair; the private key file is written with mode 0600."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public_key_pem(key.public_key()))
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot load signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(data: bytes | Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    try:
        key = serialization.load_pem_public_key(raw)
    except ValueError as exc:
        raise SignatureError(f"cannot parse public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is not an Ed25519 key")
    return key


def load_verify_key(data: bytes | Path) -> VerifyKey:
    """A verify-only Ed25519 public key from a PEM (as ``public_key_pem`` writes), without ``cryptography``."""
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    try:
        return VerifyKey.from_pem(raw)
    except ValueError as exc:
        raise SignatureError(f"cannot parse public key: {exc}") from None


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: PublicKey) -> str:
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()[:16]


def _verifies(key: PublicKey, signature: bytes, body: bytes) -> bool:
    if isinstance(key, VerifyKey):
        try:
            key.verify(signature, body)
        except InvalidSignature:
            return False
        return True
    from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature

    try:
        key.verify(signature, body)
    except CryptoInvalidSignature:
        return False
    return True


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """Return a copy of ``manifest`` with ``key_id`` and ``signature`` set."""
    unsigned = manifest.model_copy(update={"key_id": key_id(key.public_key()), "signature": None})
    sig = key.sign(canonical_bytes(unsigned))
    return unsigned.model_copy(update={"signature": base64.b64encode(sig).decode()})


def verify_manifest(manifest: Manifest, trusted: list[PublicKey]) -> PublicKey:
    """Return the trusted key that signed ``manifest``; raise ``SignatureError`` otherwise."""
    if not manifest.signature:
        raise SignatureError(f"bundle {manifest.name}:{manifest.version} is not signed")
    try:
        sig = base64.b64decode(manifest.signature, validate=True)
    except ValueError:
        raise SignatureError("signature is not valid base64") from None
    body = canonical_bytes(manifest)
    for key in trusted:
        if manifest.key_id and manifest.key_id != key_id(key):
            continue
        if _verifies(key, sig, body):
            return key
    raise SignatureError(
        f"signature of bundle {manifest.name}:{manifest.version} (key id {manifest.key_id}) "
        "does not verify against any trusted key"
    )
