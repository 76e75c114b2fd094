"""Structured logs: text or JSON lines, the request id in every record of its request (contextvars),
the root CLI's --log-format, and the hub's X-Request-ID header."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.logs import configure_logging, current_request_id, request_context


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_message_request_id_and_extras(restore_root_logging: None) -> None:
    out = io.StringIO()
    configure_logging("DEBUG", "json", stream=out)
    log = logging.getLogger("edgefed.test")
    log.info("no request here")
    with request_context("req-42"):
        log.warning("refused %s", "x", extra={"kind": "bad_payload"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    log.debug("after")
    first, refused, failed, after = _lines(out)
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["message"] == "no request here" and first["logger"] == "edgefed.test" and first["level"] == "INFO"
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert refused == {**refused, "level": "WARNING", "message": "refused x", "request_id": "req-42",
                       "kind": "bad_payload"}
    assert failed["request_id"] == "req-42" and "RuntimeError: boom" in failed["exc_info"]
    assert "request_id" not in after and after["level"] == "DEBUG"


def test_text_lines_show_the_request_id(restore_root_logging: None) -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    with request_context("abc"):
        logging.getLogger("edgefed.test").info("hello")
    logging.getLogger("edgefed.test").info("bye")
    first, second = out.getvalue().splitlines()
    assert first.endswith("INFO edgefed.test [abc]: hello")
    assert second.endswith("INFO edgefed.test: bye")


def test_request_ids_do_not_leak_between_threads() -> None:
    seen: dict[str, str | None] = {}
    entered, release = threading.Event(), threading.Event()

    def handler() -> None:
        with request_context("in-thread"):
            entered.set()
            release.wait(5)
            seen["thread"] = current_request_id()

    t = threading.Thread(target=handler)
    t.start()
    entered.wait(5)
    seen["main"] = current_request_id()
    release.set()
    t.join(5)
    assert seen == {"thread": "in-thread", "main": None}
    assert current_request_id() is None


def test_unknown_format_or_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="'xml' is not one of: text, json"):
        configure_logging("INFO", "xml")
    with pytest.raises(ValueError, match="log level 'LOUD'"):
        configure_logging("LOUD", "text")


def _edgefed(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = f"import sys; sys.argv = ['edgefed', *{list(args)!r}]; from shared.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_root_cli_log_format_option_and_envvar(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "300"}
    bad = _edgefed("--log-format", "xml", "device", "list", env=env)
    assert bad.returncode == 2 and "'xml' is not one of: text, json" in bad.stderr
    # A worker started before any `hub serve` migrated its database waits (here 0 s), then fails,
    # logging why as JSON lines, and never creates the schema itself.
    from shared.processes import free_port

    env |= {"EDGEFED_LOG_FORMAT": "json", "EDGEFED_DB_WAIT_S": "0"}
    args = ["hub", "worker", "--data-dir", str(tmp_path), "--broker-url", "mqtt://127.0.0.1:9",
            "--port", str(free_port())]
    r = _edgefed(*args, env=env)
    assert r.returncode != 0
    records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(rec) for rec in records)
    failure = " ".join(rec["message"] + rec.get("exc_info", "") for rec in records if rec["level"] == "ERROR")
    assert "start `edgefed hub serve` (it migrates) on the same database first" in failure

    import sqlite3

    with sqlite3.connect(tmp_path / "hub.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == set()


def test_hub_rest_requests_get_and_propagate_x_request_id(tmp_path: Path, restore_root_logging: None) -> None:
    from fastapi.testclient import TestClient

    from cloud_hub.config import HubSettings
    from cloud_hub.main import create_app

    # No broker: the gateway connects in the background; HTTP serves meanwhile.
    settings = HubSettings(data_dir=tmp_path, broker_url="mqtt://127.0.0.1:9", admin_token="t")
    app = create_app(settings)
    seen: list[str | None] = []

    @app.get("/_probe_sync")
    def probe_sync() -> dict[str, str]:
        seen.append(current_request_id())
        return {}

    @app.get("/_probe_async")
    async def probe_async() -> dict[str, str]:
        seen.append(current_request_id())
        return {}

    @app.get("/_probe_bug")
    def probe_bug() -> dict[str, str]:
        raise RuntimeError("a bug")

    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/_probe_sync", headers={"X-Request-ID": "edge-req-7"})
        assert r.headers["X-Request-ID"] == "edge-req-7"
        r = client.get("/_probe_async")
        generated = r.headers["X-Request-ID"]
        assert len(generated) == 32 and int(generated, 16) >= 0
        r = client.get("/_probe_sync", headers={"X-Request-ID": "bad id\twith spaces"})
        assert r.headers["X-Request-ID"] not in ("bad id\twith spaces", generated)
        # Errors carry it too.
        r = client.get("/api/v1/models/nope/versions/1", headers={"X-Request-ID": "err-1"})
        assert r.status_code in (401, 404) and r.headers["X-Request-ID"] == "err-1"
        # A bug: 500, and both the response and the logged traceback name the request id.
        r = client.get("/_probe_bug", headers={"X-Request-ID": "bug-1"})
        assert r.status_code == 500 and r.headers["X-Request-ID"] == "bug-1"
    [bug] = [rec for rec in _lines(out) if rec["level"] == "ERROR"]
    assert bug["request_id"] == "bug-1" and "RuntimeError: a bug" in bug["exc_info"]
    assert seen == ["edge-req-7", generated, seen[2]] and seen[2] not in (None, "edge-req-7", generated)
