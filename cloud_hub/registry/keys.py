"""The Ed25519 public keys the hub trusts for bundles: configured files plus ``<data_dir>/keys/*.pub``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.bundle import SignatureError, load_public_key, public_key_pem

__all__ = ["TrustedKeys", "KeyConfigError"]


class KeyConfigError(ValueError):
    """A configured public key file is missing or not an Ed25519 PEM key; the hub does not start."""


@dataclass(frozen=True)
class TrustedKeys:
    """Configured key files are checked at start; the keys directory is re-read on every use, so
    dropping a ``.pub`` file there trusts it without a restart."""

    configured: tuple[Path, ...]
    keys_dir: Path

    def check(self) -> None:
        """Raise ``KeyConfigError`` naming the first configured key that cannot be loaded."""
        for path in self.configured:
            if not path.is_file():
                raise KeyConfigError(
                    f"signing public key {path} does not exist; the hub cannot verify bundles"
                )
            try:
                load_public_key(path)
            except SignatureError as exc:
                raise KeyConfigError(f"signing public key {path} is unusable: {exc}") from None

    def load(self) -> list[Ed25519PublicKey]:
        """Every trusted key; unreadable files in the keys directory are skipped (logged by caller)."""
        keys: list[Ed25519PublicKey] = []
        seen: set[bytes] = set()
        for path in self._paths():
            try:
                key = load_public_key(path)
            except (OSError, SignatureError):
                continue
            pem = public_key_pem(key)
            if pem not in seen:
                seen.add(pem)
                keys.append(key)
        return keys

    def pems(self) -> list[str]:
        return [public_key_pem(k).decode() for k in self.load()]

    def describe(self) -> str:
        """Where keys come from, for error messages."""
        return f"--signing-public-key files or {self.keys_dir}/*.pub"

    def _paths(self) -> list[Path]:
        found = sorted(self.keys_dir.glob("*.pub")) if self.keys_dir.is_dir() else []
        return [*self.configured, *found]
