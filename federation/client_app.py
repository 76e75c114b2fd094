"""The Flower ClientApp: fine-tunes the global model on its region's own data; only weights leave.

The SuperNode's ``--node-config`` says ``region="R" data-dir="DIR"`` (and optionally ``threads=N``,
torch threads per ClientApp process, default 1). The ServerApp's config record says what to train
(architecture, task, learning rate, epochs, soft-target weight, FedProx's ``proximal-mu``). Replies
carry the weights (``arrays``), metrics (``metrics``) and the region's name (config record ``info``).

Metrics, besides ``num-examples``/``train-loss`` (or ``accuracy``/``loss``), time where a ClientApp's
round goes (seconds; ``*-at`` are Unix timestamps, so the ServerApp side can line them up):

- ``sent-at``: when the ServerApp created the message (Flower's ``metadata.created_at``);
- ``dispatch-s``: from then to this process's start (SuperLink → SuperNode poll, SuperExec poll,
  process launch);
- ``startup-s``: process start to this handler (Python, Flower's imports, pulling the message);
- ``import-s``: torch and edgefed's training modules (imported only here, never at module import);
- ``model-s``: building the model and loading the global weights;
- ``data-s``: the region's data (``federation.reference.load_region_data``; learning stores come
  from a decoded cache when unchanged);
- ``setup-s`` = import + model + data; ``compute-s``: local training (or evaluation);
- ``pack-s``: weights back to Flower arrays; ``done-at``: when the reply was ready.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.records import BUFFERS_KEY, buffers_from_config, buffers_to_config, from_record, to_record
from federation.secure_agg import secagg_mod

__all__ = ["app"]

app = ClientApp()


def _process_age_s() -> float:
    """Seconds since this process started (from /proc; 0 where unavailable)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _arrival(msg: Message) -> dict[str, float]:
    """``sent-at``, ``dispatch-s`` and ``startup-s`` for a message whose handler starts now."""
    now = time.time()
    age = _process_age_s()
    sent = float(msg.metadata.created_at)
    return {"sent-at": sent, "dispatch-s": max(0.0, now - age - sent), "startup-s": age}


def _work(op: str, msg: Message, context: Context) -> tuple[dict[str, Any] | None, dict[str, float], str]:
    """Run the task through the SuperNode's trainer (``trainer`` in the node config) or in this process."""
    from federation.trainer import request, run_task

    region = str(context.node_config.get("region", f"node-{context.node_id}"))
    data_dir = context.node_config.get("data-dir")
    if not data_dir:
        raise ValueError(f"SuperNode of region {region!r} has no data-dir in its --node-config")
    cfg = dict(msg.content["config"])
    arrays = from_record(msg.content["arrays"])
    if BUFFERS_KEY in msg.content.config_records:  # BatchNorm statistics, outside the strategy's record
        arrays.update(buffers_from_config(msg.content.config_records[BUFFERS_KEY]))
    trainer = context.node_config.get("trainer")
    if trainer:
        out, metrics = request(Path(str(trainer)), op, cfg, arrays)
    else:
        out, metrics = run_task(op, cfg, arrays, Path(str(data_dir)),
                                threads=int(context.node_config.get("threads", 1)))
    metrics["trainer"] = 1.0 if trainer else 0.0
    return out, metrics, region


@app.train(mods=[secagg_mod])  # SecAgg+ runs only (federation.secure_agg); keep this mod
def train(msg: Message, context: Context) -> Message:
    """Local fine-tuning from the global weights on the region's cases."""
    metrics: dict[str, float] = _arrival(msg)
    arrays, work, region = _work("train", msg, context)
    assert arrays is not None
    metrics.update(work)
    t0 = time.perf_counter()
    records: dict[str, Any] = {}
    if BUFFERS_KEY in msg.content.config_records:  # back the way they came
        names = set(buffers_from_config(msg.content.config_records[BUFFERS_KEY]))
        records[BUFFERS_KEY] = buffers_to_config({k: v for k, v in arrays.items() if k in names})
        arrays = {k: v for k, v in arrays.items() if k not in names}
    record = to_record(arrays)
    metrics["pack-s"] = metrics.get("pack-s", 0.0) + time.perf_counter() - t0
    metrics["done-at"] = time.time()
    content = RecordDict(
        {"arrays": record, "metrics": MetricRecord(metrics), "info": ConfigRecord({"region": region}), **records}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on the region's own labelled cases (accuracy, loss, num-examples)."""
    metrics: dict[str, float] = _arrival(msg)
    _, work, region = _work("evaluate", msg, context)
    metrics.update(work)
    metrics["done-at"] = time.time()
    content = RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"region": region})})
    return Message(content=content, reply_to=msg)
