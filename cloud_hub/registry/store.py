"""Artifacts on disk: ``<artifacts>/<name>/<version>/`` holding the pushed file and its manifest.

Files are written to a temporary name and renamed, so a crash never leaves a half-written artifact
under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ArtifactStore", "StoredArtifact", "BUNDLE_FILE", "CHECKPOINT_FILE"]

BUNDLE_FILE = "bundle.tar.gz"
CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class StoredArtifact:
    """Where an artifact landed, relative to the store root, with its digest and size."""

    relpath: str
    sha256: str
    size_bytes: int


class ArtifactStore:
    """Stores artifacts under ``root``; the constructor touches no disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(
        self, name: str, version: str, filename: str, data: bytes, manifest: dict[str, Any]
    ) -> StoredArtifact:
        """Write ``data`` and ``manifest`` for ``name:version``, replacing leftovers of a failed push."""
        version_dir = self._version_dir(name, version)
        version_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(version_dir / filename, data)
        _atomic_write(
            version_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        )
        rel = (version_dir / filename).relative_to(self.root).as_posix()
        return StoredArtifact(rel, hashlib.sha256(data).hexdigest(), len(data))

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored artifact; refuses paths that leave the store."""
        full = (self.root / relpath).resolve()
        if not full.is_relative_to(self.root.resolve()):
            raise ValueError(f"artifact path {relpath!r} leaves the artifact store")
        return full

    def remove(self, name: str, version: str) -> None:
        shutil.rmtree(self._version_dir(name, version), ignore_errors=True)

    def _version_dir(self, name: str, version: str) -> Path:
        # Names and versions are validated by their manifests' patterns (no '/', no '..').
        for part in (name, version):
            if "/" in part or part in ("", ".", ".."):
                raise ValueError(f"{part!r} cannot be used as an artifact directory name")
        return self.root / name / version


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
