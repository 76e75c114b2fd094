"""The agent's memory bounds: the feedback cache is bounded in bytes as well as cases, and the malloc
arena cap applies on glibc unless the environment already says otherwise."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.learning_store import LearningStore
from edge_agent.policy import EdgeOnlyPolicy
from edge_agent.runtime import EdgeRuntime
from edge_agent.service import EdgeService, FeedbackError
from shared.bundle import VerifiedBundle
from tests.agent_fixtures import tensor_with_confidence

pytest_plugins = ["tests.agent_fixtures"]


def test_feedback_cache_is_bounded_in_bytes(tmp_path: Path, bundle_v1: VerifiedBundle) -> None:
    case_bytes = tensor_with_confidence(0.9).nbytes  # 1x1x8x8 float32: 256 bytes
    learning = LearningStore(tmp_path / "learning.sqlite3").open()
    service = EdgeService(
        EdgeRuntime.load(bundle_v1),
        EdgeOnlyPolicy(),
        None,
        device_id="d",
        learning=learning,
        recent_cases=512,
        recent_bytes=10 * case_bytes,
    )
    try:
        ids = [asyncio.run(service.infer(tensor_with_confidence(0.9))).request_id for _ in range(25)]
        assert service.feedback(ids[-1], 1) == 1
        assert service.feedback(ids[-10], "ok") == 0  # the 10th newest is still held
        with pytest.raises(FeedbackError, match="unknown here"):
            service.feedback(ids[-11], 1)
    finally:
        learning.close()


def _limit(env: dict[str, str], arenas: int) -> str:
    code = f"from edge_agent.memory import limit_malloc_arenas; print(limit_malloc_arenas({arenas}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_malloc_arena_cap_is_applied_unless_the_environment_sets_one() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _limit(env, 1) == "True"  # the test machines run glibc
    assert _limit(env, 0) == "False"
    assert _limit({**env, "MALLOC_ARENA_MAX": "4"}, 1) == "False"
