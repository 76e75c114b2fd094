"""Metadata redaction rules as pure functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.redaction import (
    RedactionError,
    RedactionRule,
    Redactor,
    load_or_create_salt,
    parse_rules,
    validate_metadata,
)


def test_parse_rules_accepts_the_cli_form_and_lists() -> None:
    assert parse_rules("field:drop, Operator:HASH ,serial:mask") == [
        RedactionRule("field", "drop"),
        RedactionRule("operator", "hash"),
        RedactionRule("serial", "mask"),
    ]
    assert parse_rules(["a:drop", "b:mask,a:hash"]) == [RedactionRule("a", "hash"), RedactionRule("b", "mask")]
    assert parse_rules(None) == [] and parse_rules("") == []


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("operator", "write FIELD:ACTION"),
        ("operator:burn", "unknown action 'burn'; choose one of: drop, hash, mask"),
        ("op/x:drop", "write FIELD:ACTION"),
        (":drop", "write FIELD:ACTION"),
    ],
)
def test_bad_rules_are_named(spec: str, match: str) -> None:
    with pytest.raises(RedactionError, match=match):
        parse_rules(spec)


def test_apply_drops_hashes_masks_and_keeps_the_rest() -> None:
    r = Redactor(parse_rules("badge:drop,operator:hash,serial:mask"), b"site-salt")
    out = r.apply({"badge": "B-17", "Operator": "Alice Smith", "serial": "SN-123456789", "line": "3"})
    assert set(out) == {"Operator", "serial", "line"}
    assert out["Operator"].startswith("h:") and len(out["Operator"]) == 18 and "Alice" not in out["Operator"]
    assert out["serial"] == "********6789"
    assert out["line"] == "3"
    # Same value, same salt: same pseudonym (the hub can group); another site's salt: another one.
    assert r.apply({"operator": "Alice Smith"})["operator"] == out["Operator"]
    other = Redactor(parse_rules("operator:hash"), b"other-site")
    assert other.apply({"operator": "Alice Smith"})["operator"] != out["Operator"]
    assert r.apply({"serial": "abc"}) == {"serial": "***"}


def test_drop_unlisted_keeps_only_fields_with_a_rule() -> None:
    r = Redactor(parse_rules("serial:mask"), b"s", drop_unlisted=True)
    assert r.apply({"serial": "123456", "name": "Bob"}) == {"serial": "**3456"}


def test_empty_salt_is_refused() -> None:
    with pytest.raises(RedactionError, match="salt is empty"):
        Redactor([], b"")


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (["a"], "must be a JSON object"),
        ({"a b": "x"}, "field name 'a b' is invalid"),
        ({"a": {"b": 1}}, "must be a string or number"),
        ({"a": "x" * 257}, "at most 256"),
        ({f"f{i}": "x" for i in range(33)}, "at most 32"),
    ],
)
def test_bad_metadata_is_named(meta: object, match: str) -> None:
    with pytest.raises(RedactionError, match=match):
        validate_metadata(meta)


def test_numbers_become_strings() -> None:
    assert validate_metadata({"line": 3, "ok": True}) == {"line": "3", "ok": "True"}


def test_salt_is_created_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "redaction.salt"
    first = load_or_create_salt(path)
    assert len(first) == 32 and load_or_create_salt(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
