"""The Flower ClientApp: fine-tunes the global model on its region's own data; only weights leave.

The SuperNode's ``--node-config`` says ``region="R" data-dir="DIR"`` (and optionally ``threads=N``,
torch threads per ClientApp process, default 1). The ServerApp's config record says what to train
(architecture, task, learning rate, epochs, soft-target weight, FedProx's ``proximal-mu``). Replies
carry the weights (``arrays``), metrics (``metrics``: ``num-examples``, ``train-loss``,
``compute-s`` = local training time, ``startup-s`` = time from process start to this handler,
``setup-s`` = torch import, model and data loading) and
the region's name (config record ``info``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.records import from_record, to_record

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


def _setup(msg: Message, context: Context) -> tuple[Any, Any, dict[str, Any], str]:
    import torch

    from federation.reference import load_region_data
    from federation.training import load_arrays
    from shared.models import build_model

    region = str(context.node_config.get("region", f"node-{context.node_id}"))
    data_dir = context.node_config.get("data-dir")
    if not data_dir:
        raise ValueError(f"SuperNode of region {region!r} has no data-dir in its --node-config")
    torch.set_num_threads(int(context.node_config.get("threads", 1)))
    cfg = msg.content["config"]
    kwargs = json.loads(str(cfg["arch-kwargs"]))
    model = build_model(str(cfg["arch"]), **kwargs)
    load_arrays(model, from_record(msg.content["arrays"]))
    chw = tuple(int(v) for v in json.loads(str(cfg["input-chw"])))
    data, _info = load_region_data(
        Path(str(data_dir)), task=str(cfg["task"]), num_classes=int(cfg["num-classes"]), input_chw=chw
    )
    return model, data, cfg, region


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local fine-tuning from the global weights on the region's cases."""
    startup = _process_age_s()
    from federation.training import state_to_arrays, train_local

    t0 = time.perf_counter()
    model, data, cfg, region = _setup(msg, context)
    setup = time.perf_counter() - t0
    metrics = train_local(
        model,
        data,
        epochs=int(cfg["local-epochs"]),
        lr=float(cfg["lr"]),
        batch_size=int(cfg["batch-size"]),
        soft_weight=float(cfg["soft-weight"]),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        seed=int(cfg.get("seed", 0)) + int(cfg.get("server-round", 0)),
    )
    metrics["startup-s"] = startup
    metrics["setup-s"] = setup
    content = RecordDict(
        {
            "arrays": to_record(state_to_arrays(model)),
            "metrics": MetricRecord(metrics),
            "info": ConfigRecord({"region": region}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on the region's own labelled cases (accuracy, loss, num-examples)."""
    startup = _process_age_s()
    from federation.training import evaluate as evaluate_model

    model, data, _cfg, region = _setup(msg, context)
    t0 = time.perf_counter()
    metrics = evaluate_model(model, data)
    if metrics["num-examples"] == 0:
        raise ValueError(f"region {region!r} has no labelled cases to evaluate on")
    metrics["compute-s"] = time.perf_counter() - t0
    metrics["startup-s"] = startup
    content = RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"region": region})})
    return Message(content=content, reply_to=msg)
