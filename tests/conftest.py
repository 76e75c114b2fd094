"""Fixtures shared by all tests: real mosquitto on a free loopback port, temporary data dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.broker import DevBroker
from shared.processes import free_port


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DevBroker]:
    """A real mosquitto on 127.0.0.1:<free port>, stopped (by its PID group) after the test."""
    b = DevBroker("127.0.0.1", free_port(), tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBroker]:
    """One mosquitto for tests that only need a broker to exist; each test uses its own topics."""
    b = DevBroker("127.0.0.1", free_port(), tmp_path_factory.mktemp("broker")).start()
    try:
        yield b
    finally:
        b.stop()
