"""Writing, packing, unpacking and verifying bundles on disk.

A bundle is a directory (or a ``.tar.gz`` of one) holding ``model.onnx`` and ``manifest.json``.
``open_bundle`` is the single place that decides whether a bundle may be used: it checks the
manifest schema, the model file's SHA-256 and the Ed25519 signature, and raises ``BundleError``
naming the first problem.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from shared.bundle.manifest import Manifest
from shared.bundle.signing import SignatureError, sign_manifest, verify_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.bundle.signing import PublicKey

__all__ = [
    "MANIFEST_FILE",
    "MAX_ARCHIVE_BYTES",
    "BundleError",
    "VerifiedBundle",
    "sha256_file",
    "write_bundle",
    "read_manifest",
    "open_bundle",
    "pack_bundle",
    "unpack_bundle",
]

MANIFEST_FILE = "manifest.json"
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024


class BundleError(ValueError):
    """A bundle is malformed, tampered with or not signed by a trusted key."""


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(out_dir: Path, model_file: Path, manifest: Manifest, key: Ed25519PrivateKey) -> VerifiedBundle:
    """Copy ``model_file`` into ``out_dir``, fill in hash and size, sign and write the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / manifest.model_file
    if Path(model_file).resolve() != target.resolve():
        shutil.copyfile(model_file, target)
    filled = manifest.model_copy(
        update={"model_sha256": sha256_file(target), "model_size_bytes": target.stat().st_size}
    )
    signed = sign_manifest(filled, key)
    (out_dir / MANIFEST_FILE).write_text(signed.to_json() + "\n")
    return VerifiedBundle(path=out_dir, manifest=signed)


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse ``manifest.json`` without verifying anything."""
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir} has no {MANIFEST_FILE}; it is not a bundle") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise BundleError(f"{path} is not a valid manifest: {loc}: {err['msg']}") from None


def open_bundle(bundle_dir: Path, trusted: list[PublicKey]) -> VerifiedBundle:
    """Verify a bundle directory: manifest, model hash and signature."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if Path(manifest.model_file).name != manifest.model_file:
        raise BundleError(f"manifest names model file {manifest.model_file!r} outside the bundle")
    model = bundle_dir / manifest.model_file
    if not model.is_file():
        raise BundleError(f"bundle {manifest.name}:{manifest.version} has no {manifest.model_file}")
    digest = sha256_file(model)
    if digest != manifest.model_sha256:
        raise BundleError(
            f"bundle {manifest.name}:{manifest.version}: SHA-256 of {manifest.model_file} is {digest[:16]}..., "
            f"the manifest says {manifest.model_sha256[:16]}...; the model file was altered"
        )
    try:
        verify_manifest(manifest, trusted)
    except SignatureError as exc:
        raise BundleError(str(exc)) from None
    return VerifiedBundle(path=bundle_dir, manifest=manifest)


def pack_bundle(bundle_dir: Path) -> bytes:
    """A ``.tar.gz`` of the bundle's two files, in memory (bundles are megabytes, not gigabytes)."""
    manifest = read_manifest(bundle_dir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in (MANIFEST_FILE, manifest.model_file):
            tar.add(Path(bundle_dir) / name, arcname=name)
    return buf.getvalue()


def unpack_bundle(data: bytes, out_dir: Path) -> Path:
    """Unpack a bundle archive into ``out_dir``; only plain top-level files are accepted."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise BundleError(f"bundle archive is {len(data)} bytes; the limit is {MAX_ARCHIVE_BYTES}")
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                for member in tar.getmembers():
                    if not member.isfile() or "/" in member.name or member.name in ("", ".", ".."):
                        raise BundleError(f"bundle archive holds {member.name!r}, which is not a plain top-level file")
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise BundleError(f"bundle archive is not a readable tar.gz: {exc}") from None
        read_manifest(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return out_dir
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
