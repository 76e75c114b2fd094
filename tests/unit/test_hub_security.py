"""Tokens, bearer parsing, the admin token file, and the hub's settings parsing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cloud_hub.config import HubSettings
from cloud_hub.security import (
    generate_token,
    hash_token,
    load_or_create_admin_token,
    parse_bearer,
    token_matches,
)


def test_tokens_are_random_and_only_their_hash_matches() -> None:
    a, b = generate_token(), generate_token()
    assert a != b and len(a) >= 40
    digest = hash_token(a)
    assert len(digest) == 64 and a not in digest
    assert token_matches(a, digest)
    assert not token_matches(b, digest)
    assert not token_matches(a[:-1], digest)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_bearer(header: str | None, expected: str | None) -> None:
    assert parse_bearer(header) == expected


def test_admin_token_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    token_file = tmp_path / "hub" / "admin.token"
    first = load_or_create_admin_token(None, token_file)
    assert token_file.read_text().strip() == first
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert load_or_create_admin_token(None, token_file) == first
    # A token given on the command line wins and leaves the file alone.
    assert load_or_create_admin_token("given", token_file) == "given"
    assert token_file.read_text().strip() == first


def test_settings_split_signing_keys_and_read_hub_specific_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGEFED_SIGNING_PUBLIC_KEY", "a.pub, b.pub")
    monkeypatch.setenv("EDGEFED_HUB_PORT", "9123")
    monkeypatch.setenv("EDGEFED_BROKER_URL", "mqtt://10.0.0.1:1884")
    s = HubSettings(data_dir=tmp_path)
    assert s.signing_public_keys == [Path("a.pub"), Path("b.pub")]
    assert s.port == 9123 and s.broker_url == "mqtt://10.0.0.1:1884"
    assert s.database_url == f"sqlite:///{(tmp_path / 'hub.db').resolve()}"
    explicit = HubSettings(port=1, signing_public_keys=["x.pub,y.pub", "z.pub"], db_url="sqlite://")
    assert explicit.port == 1
    assert explicit.signing_public_keys == [Path("x.pub"), Path("y.pub"), Path("z.pub")]
    assert explicit.database_url == "sqlite://"
