"""What cuts a federation round's orchestration overhead: the decoded-store cache, a torch-free ClientApp
import, the poll settings, and the bench's per-round breakdown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from federation.messaging import DEFAULT_REPLY_POLL_S, reply_poll_s
from federation.processes import DEFAULT_TASK_POLL_S, flwr_env
from federation.reference import load_region_data
from federation.region_cache import CACHE_DIR, store_digest
from shared.bench.fed import round_breakdown
from tests.fed_fixtures import make_learning_store, toy_images
from tests.hub_fixtures import TASK

CHW = (1, 32, 32)


def _load(data_dir: Path) -> tuple[object, dict]:
    return load_region_data(data_dir, task=TASK, num_classes=2, input_chw=CHW)


def _first_hit(data_dir: Path) -> tuple[object, dict]:
    """Load until the cache answers (at most 3 reads); fail if it never does."""
    for _ in range(3):
        data, info = _load(data_dir)
        if info["cache_hits"] == 1:
            return data, info
    raise AssertionError("the cache never answered for unchanged store bytes")


def test_decoded_store_is_cached_and_invalidated_when_the_store_changes(tmp_path: Path) -> None:
    from edge_agent.learning_store import LearningStore

    make_learning_store(tmp_path, 16, seed=3)
    first, info1 = _load(tmp_path)
    assert info1["cache_hits"] == 0 and len(first) == 12  # 4 unanswered cases skipped
    # SQLite may checkpoint the agent's WAL when the first reader closes: those bytes changed, so the
    # cache is written by the first read of stable bytes at the latest.
    second, info2 = _first_hit(tmp_path)
    assert len(list((tmp_path / CACHE_DIR).glob("*.npz"))) == 1
    assert info2["skipped"] == info1["skipped"]
    assert np.array_equal(first.x.numpy(), second.x.numpy()) and np.array_equal(first.hard, second.hard)
    assert np.array_equal(first.soft.numpy(), second.soft.numpy(), equal_nan=True)

    # A new confirmed case changes the store's bytes: decoded again, and the new case is there.
    x, _ = toy_images(1, seed=7)
    store = LearningStore(tmp_path / "agent-1" / "learning.sqlite3").open()
    try:
        store.record_case("new", x, task=TASK, model_name="t-edge", model_version="1", edge_label=0,
                          edge_confidence=0.5)
        store.confirm("new", 1)
    finally:
        store.close()
    third, info3 = _load(tmp_path)
    assert info3["cache_hits"] == 0 and len(third) == 13
    assert int(third.hard[-1]) == 1
    fourth, _ = _first_hit(tmp_path)
    assert len(fourth) == 13
    assert len(list((tmp_path / CACHE_DIR).glob("*.npz"))) == 1  # replaced, not piling up


def test_cache_is_per_task_and_shape_and_never_read_as_site_data(tmp_path: Path) -> None:
    make_learning_store(tmp_path, 8, seed=1)
    _first_hit(tmp_path)
    # Another input resolution is another cache entry, not the 32x32 arrays.
    data, info = load_region_data(tmp_path, task=TASK, num_classes=2, input_chw=(1, 16, 16))
    assert info["cache_hits"] == 0 and tuple(data.x.shape[1:]) == (1, 16, 16)
    assert len(list((tmp_path / CACHE_DIR).glob("*.npz"))) == 2
    # The cache's .npz files are not labelled site data (they have no x/y and would fail read_npz).
    assert _load(tmp_path)[1]["npz"] == 0


def test_tampered_cache_file_is_ignored(tmp_path: Path) -> None:
    make_learning_store(tmp_path, 8, seed=2)
    before, _ = _first_hit(tmp_path)
    (cache,) = (tmp_path / CACHE_DIR).glob("*.npz")
    cache.write_bytes(b"not an npz")
    after, info = _load(tmp_path)
    assert info["cache_hits"] == 0 and np.array_equal(before.x.numpy(), after.x.numpy())
    assert _load(tmp_path)[1]["cache_hits"] == 1  # rewritten (the store's bytes were stable already)


def test_store_digest_covers_the_wal_file(tmp_path: Path) -> None:
    db = tmp_path / "learning.sqlite3"
    db.write_bytes(b"main")
    d1 = store_digest(db)
    (tmp_path / "learning.sqlite3-wal").write_bytes(b"frames")
    assert store_digest(db) != d1


def test_client_app_module_does_not_import_torch() -> None:
    code = "import sys, federation.client_app; print(sorted(m for m in ('torch', 'sqlalchemy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_poll_settings_reach_flower_and_the_server_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert float(flwr_env(tmp_path)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) == DEFAULT_TASK_POLL_S
    env = flwr_env(tmp_path, task_poll_s=0.5, reply_poll_s=1.5)
    assert float(env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) == 0.5 and float(env["EDGEFED_FED_REPLY_POLL_S"]) == 1.5
    monkeypatch.delenv("EDGEFED_FED_REPLY_POLL_S", raising=False)
    assert reply_poll_s() == DEFAULT_REPLY_POLL_S
    monkeypatch.setenv("EDGEFED_FED_REPLY_POLL_S", "0.05")
    assert reply_poll_s() == 0.05
    for bad in ("fast", "0", "11"):
        monkeypatch.setenv("EDGEFED_FED_REPLY_POLL_S", bad)
        with pytest.raises(ValueError, match="EDGEFED_FED_REPLY_POLL_S"):
            reply_poll_s()


def test_round_breakdown_follows_the_region_that_finished_last() -> None:
    def region(sent: float, done: float, compute: float) -> dict:
        return {"train": {"sent-at": sent, "done-at": done, "dispatch-s": 3.0, "startup-s": 2.0, "import-s": 1.5,
                          "model-s": 0.1, "data-s": 0.2, "compute-s": compute, "pack-s": 0.01}}

    entry = {"round_wall_s": 10.0, "per_region": {"a": region(100.0, 107.0, 0.5), "b": region(100.0, 109.0, 2.0)}}
    b = round_breakdown(entry)
    assert b is not None and b["compute"] == 2.0  # region b's reply was ready last
    assert b["reply"] == pytest.approx(1.0)  # round ended at 110, b was done at 109
    assert b["unaccounted"] == pytest.approx(10.0 - (3.0 + 2.0 + 1.5 + 0.1 + 0.2 + 2.0 + 0.01 + 1.0))
    assert round_breakdown({"round_wall_s": 1.0, "per_region": {"a": {"train": {"compute-s": 1.0}}}}) is None


def test_client_timing_metrics_are_plain_floats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's MetricRecord only takes numbers: the ClientApp's arrival timings must be floats."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from federation.client_app import _arrival

    for attr in ("_task_id", "_run_id", "_node_id"):  # what flwr-clientapp sets when it pulls its task
        monkeypatch.setattr(TaskIdentity, attr, 1)
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    m = _arrival(msg)
    MetricRecord(m)
    assert m["startup-s"] > 0 and m["dispatch-s"] >= 0 and abs(m["sent-at"] - msg.metadata.created_at) < 1e-9
