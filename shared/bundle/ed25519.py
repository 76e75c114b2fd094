"""Ed25519 public keys and signature checks without importing ``cryptography``.

Verifying a bundle needs only an Ed25519 public key and one signature check. ``cryptography`` does
that, but importing it costs a serving process ~7.5 MiB of resident memory (its Rust extension and
every asymmetric algorithm it registers) for a check made a few times a day. This module checks the
signature with the OpenSSL that CPython itself already loaded for ``hashlib``/``ssl`` (through
``ctypes``: ``EVP_PKEY_new_raw_public_key`` + ``EVP_DigestVerify``, OpenSSL >= 1.1.1), which costs
nothing extra, and falls back to ``cryptography`` (imported then) where no such OpenSSL is found.

``VerifyKey.from_pem`` reads exactly the SubjectPublicKeyInfo PEM that ``public_key_pem`` writes
(a fixed 12-byte DER prefix and the 32 raw key bytes) and refuses anything else.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import re
import threading
from typing import Any

__all__ = ["InvalidSignature", "VerifyKey", "openssl_available"]

# DER of SubjectPublicKeyInfo { AlgorithmIdentifier { id-Ed25519 (1.3.101.112) }, BIT STRING (32 bytes) }.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM = re.compile(rb"\A\s*-----BEGIN PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END PUBLIC KEY-----\s*\Z")
_NID_ED25519 = 1087  # NID_ED25519 / EVP_PKEY_ED25519, fixed since OpenSSL 1.1.1


class InvalidSignature(ValueError):
    """The signature does not verify under this key (or is malformed)."""


class _OpenSSL:
    """The few libcrypto functions an Ed25519 verification needs, bound once."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, sz, ch = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        self.new_key = _bind(lib.EVP_PKEY_new_raw_public_key, vp, [ctypes.c_int, vp, ch, sz])
        self.free_key = _bind(lib.EVP_PKEY_free, None, [vp])
        self.new_ctx = _bind(lib.EVP_MD_CTX_new, vp, [])
        self.free_ctx = _bind(lib.EVP_MD_CTX_free, None, [vp])
        self.init = _bind(lib.EVP_DigestVerifyInit, ctypes.c_int, [vp, vp, vp, vp, vp])
        self.verify = _bind(lib.EVP_DigestVerify, ctypes.c_int, [vp, ch, sz, ch, sz])
        self.clear_errors = _bind(lib.ERR_clear_error, None, [])

    def check(self, raw_key: bytes, signature: bytes, data: bytes) -> bool:
        key = self.new_key(_NID_ED25519, None, raw_key, len(raw_key))
        if not key:
            self.clear_errors()
            raise InvalidSignature("OpenSSL refused the Ed25519 public key")
        ctx = self.new_ctx()
        try:
            if not ctx or self.init(ctx, None, None, None, key) != 1:
                self.clear_errors()
                raise RuntimeError("OpenSSL could not start an Ed25519 verification")
            ok = self.verify(ctx, signature, len(signature), data, len(data)) == 1
            if not ok:
                self.clear_errors()  # leave no error on the queue that CPython's ssl would later report
            return ok
        finally:
            if ctx:
                self.free_ctx(ctx)
            self.free_key(key)


def _bind(fn: Any, restype: Any, argtypes: list[Any]) -> Any:
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


_lock = threading.Lock()
_openssl: _OpenSSL | None = None
_probed = False


def _loaded_libcrypto() -> str | None:
    """Path of the libcrypto this process already mapped (CPython's ``_hashlib`` links it), if any."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.rsplit(None, 1)[-1]
                if "/libcrypto.so" in path:
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("crypto")


def _get_openssl() -> _OpenSSL | None:
    global _openssl, _probed
    with _lock:
        if not _probed:
            _probed = True
            hashlib.sha256()  # _hashlib (and with it libcrypto) is loaded by now where CPython has it
            path = _loaded_libcrypto()
            try:
                _openssl = _OpenSSL(ctypes.CDLL(path)) if path else None
            except (OSError, AttributeError):
                _openssl = None  # no libcrypto, or one older than 1.1.1 (no raw Ed25519 keys)
        return _openssl


def openssl_available() -> bool:
    """True when signatures are checked with the process's own OpenSSL (no ``cryptography`` import)."""
    return _get_openssl() is not None


class VerifyKey:
    """An Ed25519 public key that can only verify; ``verify`` raises ``InvalidSignature`` like cryptography's."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self._raw = bytes(raw)

    @classmethod
    def from_pem(cls, pem: bytes) -> VerifyKey:
        """The key in one SubjectPublicKeyInfo PEM block; ValueError naming the problem otherwise."""
        match = _PEM.match(pem)
        if match is None:
            raise ValueError("not a single '-----BEGIN PUBLIC KEY-----' PEM block")
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"PEM body is not valid base64: {exc}") from None
        if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
            raise ValueError("public key is not an Ed25519 key")
        return cls(der[len(_SPKI_PREFIX) :])

    def public_bytes_raw(self) -> bytes:
        """The 32 raw key bytes (same name as cryptography's ``Ed25519PublicKey.public_bytes_raw``)."""
        return self._raw

    def verify(self, signature: bytes, data: bytes) -> None:
        if len(signature) != 64:
            raise InvalidSignature(f"an Ed25519 signature is 64 bytes, got {len(signature)}")
        lib = _get_openssl()
        if lib is not None:
            if not lib.check(self._raw, signature, data):
                raise InvalidSignature("signature does not verify")
            return
        from cryptography.exceptions import InvalidSignature as CryptoInvalid
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self._raw).verify(signature, data)
        except CryptoInvalid:
            raise InvalidSignature("signature does not verify") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey({hashlib.sha256(self._raw).hexdigest()[:16]})"
