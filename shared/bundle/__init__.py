"""Signed model bundles: manifest, Ed25519 signing, and verified loading."""

from shared.bundle.manifest import BundleMetrics, InputSpec, Manifest, Provenance, canonical_bytes
from shared.bundle.signing import (
    SignatureError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_verify_key,
    public_key_pem,
    sign_manifest,
    verify_manifest,
)
from shared.bundle.store import (
    MANIFEST_FILE,
    BundleError,
    VerifiedBundle,
    open_bundle,
    pack_bundle,
    read_manifest,
    sha256_file,
    unpack_bundle,
    write_bundle,
)

__all__ = [
    "MANIFEST_FILE",
    "BundleError",
    "BundleMetrics",
    "InputSpec",
    "Manifest",
    "Provenance",
    "SignatureError",
    "VerifiedBundle",
    "canonical_bytes",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_verify_key",
    "open_bundle",
    "pack_bundle",
    "public_key_pem",
    "read_manifest",
    "sha256_file",
    "sign_manifest",
    "unpack_bundle",
    "verify_manifest",
    "write_bundle",
]
