"""Which bundle this agent may run: trusted keys, download, verification, and the on-disk store.

Layout under ``<data-dir>``::

    trusted_keys.pem               pinned hub keys (trust on first use) unless --trusted-key is given
    bundles/<name>-<version>/      verified bundles (model.onnx + manifest.json)
    bundles/current.json           the bundle last activated, preferred when the hub is unreachable
    rollback.json                  an operator's rollback, kept across restarts (``edge_agent.rollback``)

A downloaded archive is unpacked into a staging directory and verified there (``open_bundle``:
manifest, SHA-256, Ed25519 signature); only a bundle that verifies is moved into place, so a
tampered download never replaces anything and the agent keeps serving what it has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from shared.api_schemas import AssignmentPublic
from shared.bundle import (
    BundleError,
    SignatureError,
    VerifiedBundle,
    load_verify_key,
    open_bundle,
    unpack_bundle,
)
from shared.bundle.ed25519 import VerifyKey
from shared.hub_client import HubClient, HubError

__all__ = ["BundleStore", "TrustError", "fetch_assigned", "load_trusted_keys", "parse_public_keys"]

log = logging.getLogger(__name__)

_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)
_CURRENT = "current.json"


class TrustError(RuntimeError):
    """No trusted signing key could be established, so no bundle can be verified; the agent cannot start."""


def parse_public_keys(pem: bytes, source: str) -> list[VerifyKey]:
    """All Ed25519 public keys in a PEM file (one or more concatenated blocks), as verify-only keys: the
    agent checks signatures with the process's own OpenSSL and never imports ``cryptography``."""
    blocks = _PEM_BLOCK.findall(pem)
    if not blocks:
        raise TrustError(f"{source} holds no PEM public key; expected '-----BEGIN PUBLIC KEY-----' blocks")
    try:
        return [load_verify_key(block) for block in blocks]
    except SignatureError as exc:
        raise TrustError(f"{source}: {exc}") from None


def load_trusted_keys(trusted_key: Path | None, pinned_path: Path, hub: HubClient) -> list[VerifyKey]:
    """The keys bundles must be signed with.

    ``trusted_key`` (an operator-provided file) wins; otherwise the keys pinned at ``pinned_path``;
    otherwise the hub's ``GET /api/v1/keys``, pinned now (trust on first use).
    """
    if trusted_key is not None:
        try:
            return parse_public_keys(Path(trusted_key).read_bytes(), str(trusted_key))
        except OSError as exc:
            raise TrustError(f"cannot read trusted key {trusted_key}: {exc}") from None
    if pinned_path.is_file():
        return parse_public_keys(pinned_path.read_bytes(), str(pinned_path))
    try:
        pems = hub.signing_keys().keys
    except HubError as exc:
        raise TrustError(
            f"no --trusted-key given, no pinned keys at {pinned_path}, and the hub's keys are unavailable "
            f"({exc}); cannot verify any bundle"
        ) from None
    data = "\n".join(p.strip() for p in pems).encode() + b"\n"
    keys = parse_public_keys(data, f"{hub.base_url}/api/v1/keys")
    pinned_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pinned_path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, pinned_path)
    log.warning(
        "trusting %d signing key(s) from the hub %s on first use and pinning them in %s; pass --trusted-key "
        "to pin a key you distributed yourself",
        len(keys),
        hub.base_url,
        pinned_path,
    )
    return keys


class BundleStore:
    """Verified bundles under one directory; every read verifies again against ``trusted``."""

    def __init__(self, root: Path, trusted: list[VerifyKey]) -> None:
        self.root = Path(root)
        self.trusted = trusted

    def path_for(self, name: str, version: str) -> Path:
        return self.root / f"{name}-{version}"

    def open_existing(self, name: str, version: str) -> VerifiedBundle | None:
        """The stored bundle ``name:version`` if present and still verifying; None otherwise."""
        path = self.path_for(name, version)
        if not path.is_dir():
            return None
        try:
            return self._open(path, name, version)
        except BundleError as exc:
            log.error("stored bundle %s does not verify (%s); it will be downloaded again", path, exc)
            return None

    def install(self, archive: bytes, expected: AssignmentPublic | None = None) -> VerifiedBundle:
        """Unpack and verify ``archive`` in staging, then move it into place; BundleError if refused."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".incoming-{uuid.uuid4().hex}"
        try:
            unpack_bundle(archive, staging)
            staged = open_bundle(staging, self.trusted)
            m = staged.manifest
            if expected is not None:
                _check_matches_assignment(staged, expected, archive)
            final = self.path_for(m.name, m.version)
            if final.exists():
                old = final.with_name(f".old-{uuid.uuid4().hex}")
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            staging.rename(final)
            return self._open(final, m.name, m.version)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def local_bundles(self) -> list[VerifiedBundle]:
        """Every stored bundle that verifies; the others are logged and skipped."""
        found: list[VerifiedBundle] = []
        if not self.root.is_dir():
            return found
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                found.append(open_bundle(path, self.trusted))
            except BundleError as exc:
                log.error("skipping stored bundle %s: %s", path, exc)
        return found

    def best_local(self, model_name: str | None = None) -> VerifiedBundle | None:
        """The bundle last activated if it still verifies, else the newest verified one (by created_at)."""
        current = self._read_current()
        if current is not None and (model_name is None or current[0] == model_name):
            bundle = self.open_existing(*current)
            if bundle is not None:
                return bundle
        candidates = [b for b in self.local_bundles() if model_name is None or b.manifest.name == model_name]
        return max(candidates, key=lambda b: b.manifest.created_at, default=None)

    def mark_current(self, bundle: VerifiedBundle) -> None:
        """Remember ``bundle`` as the one to serve when the hub cannot be asked."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{_CURRENT}.tmp"
        tmp.write_text(json.dumps({"name": bundle.manifest.name, "version": bundle.manifest.version}))
        os.replace(tmp, self.root / _CURRENT)

    def _read_current(self) -> tuple[str, str] | None:
        try:
            data = json.loads((self.root / _CURRENT).read_text())
            return str(data["name"]), str(data["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _open(self, path: Path, name: str, version: str) -> VerifiedBundle:
        bundle = open_bundle(path, self.trusted)
        if (bundle.manifest.name, bundle.manifest.version) != (name, version):
            raise BundleError(f"{path} holds {bundle.manifest.name}:{bundle.manifest.version}, not {name}:{version}")
        return bundle


def _check_matches_assignment(bundle: VerifiedBundle, expected: AssignmentPublic, archive: bytes) -> None:
    m = bundle.manifest
    if (m.name, m.version) != (expected.model_name, expected.version):
        raise BundleError(
            f"hub assigned {expected.model_name}:{expected.version} but the downloaded bundle is "
            f"{m.name}:{m.version}; refusing it"
        )
    # The hub may publish the model file's hash (as in the manifest) or the archive's; both pin the bytes.
    if expected.sha256 not in (m.model_sha256, hashlib.sha256(archive).hexdigest()):
        raise BundleError(
            f"bundle {m.name}:{m.version}: SHA-256 {m.model_sha256[:16]}... does not match the hub's "
            f"assignment ({expected.sha256[:16]}...); refusing it"
        )


def fetch_assigned(
    hub: HubClient, device_id: str, store: BundleStore, assignment: AssignmentPublic | None = None
) -> VerifiedBundle:
    """The bundle the hub assigns to ``device_id``: from disk if already verified there, else downloaded.

    ``assignment`` is the hub's answer when the caller already asked for it. Raises ``HubError`` when
    the hub cannot be asked and ``BundleError`` when the download is refused.
    """
    if assignment is None:
        assignment = hub.get_assignment(device_id)
    existing = store.open_existing(assignment.model_name, assignment.version)
    if existing is not None and assignment.sha256 in (existing.manifest.model_sha256, ""):
        return existing
    log.info("downloading bundle %s:%s from %s", assignment.model_name, assignment.version, hub.base_url)
    archive = hub.download_artifact(assignment.model_name, assignment.version)
    return store.install(archive, assignment)
