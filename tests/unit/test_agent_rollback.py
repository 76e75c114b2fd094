"""The remembered rollback file: round trip, atomic replacement, and bad files ignored with a log line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.rollback import RollbackState, clear_rollback, load_rollback, save_rollback


def test_round_trip_replaces_atomically_and_clears(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "rollback.json"
    assert load_rollback(path) is None
    save_rollback(path, RollbackState(("tiny", "1.0.0"), ("tiny", "2.0.0")))
    save_rollback(path, RollbackState(("tiny", "2.0.0"), ("tiny", "1.0.0")))
    assert load_rollback(path) == RollbackState(serving=("tiny", "2.0.0"), rolled_back_from=("tiny", "1.0.0"))
    assert [p.name for p in path.parent.iterdir()] == ["rollback.json"]  # no temporary file left behind
    clear_rollback(path)
    clear_rollback(path)
    assert load_rollback(path) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "malformed"),
        ("[1, 2]", "expected a JSON object"),
        ('{"serving": {"name": "tiny"}, "rolled_back_from": {"name": "tiny", "version": "2"}}', "'serving'"),
        ('{"serving": {"name": "tiny", "version": "1"}}', "'rolled_back_from'"),
        ('{"serving": {"name": "", "version": "1"}, "rolled_back_from": {"name": "t", "version": "2"}}', "'serving'"),
    ],
)
def test_bad_file_is_ignored_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, problem: str
) -> None:
    path = tmp_path / "rollback.json"
    path.write_text(text)
    with caplog.at_level(logging.ERROR, logger="edge_agent.rollback"):
        assert load_rollback(path) is None
    assert str(path) in caplog.text and problem in caplog.text
    assert path.read_text() == text  # left as it was, for the operator to look at
