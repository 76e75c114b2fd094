"""The escalation circuit breaker as a state machine on a fake clock."""

from __future__ import annotations

import pytest

from edge_agent.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker(failures=3, cooldown_s=5, clock=Clock())
    for _ in range(2):
        b.record(False)
    b.record(True, 10.0)  # a success in between resets the count
    b.record(False)
    b.record(False)
    assert b.state == "closed" and b.allow()
    b.record(False)
    assert b.state == "open" and b.opened == 1
    assert not b.allow() and b.short_circuited == 1


def test_cooldown_then_one_probe_then_close_or_reopen() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    b.record(False)
    clock.t += 4.9
    assert b.state == "open" and not b.allow()
    clock.t += 0.2
    assert b.state == "half-open"
    assert b.allow() is True  # the probe
    assert b.allow() is False  # only one at a time
    b.record(False)  # the probe failed: open for another cool-down
    assert b.state == "open" and b.opened == 2
    clock.t += 5.0
    assert b.allow() is True
    b.record(True, 3.0)
    assert b.state == "closed" and b.allow() and b.allow()


def test_slow_answers_count_as_failures_when_a_budget_is_set() -> None:
    b = CircuitBreaker(failures=2, cooldown_s=1, latency_budget_ms=50, clock=Clock())
    b.record(True, 49.0)
    b.record(True, 80.0)
    assert b.state == "closed"
    b.record(True, 51.0)
    assert b.state == "open"
    unbudgeted = CircuitBreaker(failures=1, cooldown_s=1, clock=Clock())
    unbudgeted.record(True, 10_000.0)
    assert unbudgeted.state == "closed"


@pytest.mark.parametrize(("kw", "match"), [({"failures": 0}, "failures"), ({"cooldown_s": 0}, "cool-down")])
def test_bad_settings(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CircuitBreaker(**kw)
