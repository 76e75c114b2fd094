"""The ClientApp side of SecAgg+: Flower's ``secaggplus_mod`` around edgefed's own training handler.

Flower 1.41 has SecAgg+ only on its legacy path: the ServerApp's ``SecAggPlusWorkflow``
(``federation.secure_agg_server``) sends each region four ``train`` messages (setup, share keys,
collect masked vectors, unmask), and the ClientApp answers them through ``secaggplus_mod``, which keeps
its keys in the node's ``Context.state`` between messages. Only in the third stage does the region
train: the message then carries legacy ``FitIns`` (weights as a list, the array names in the config
``array-names``), which :func:`secagg_mod` turns into the message-API ``arrays``/``config`` that
``federation.client_app.train`` reads, and whose reply it turns back into a ``FitRes``. The mod then
quantises, masks and sends the weights; the unmasked weights never leave the SuperNode.

Messages of runs without SecAgg+ (no ``secaggplus_configs`` record) pass through untouched, and
nothing of Flower's secure-aggregation code is imported for them.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from federation.records import from_record, to_record

__all__ = ["SECAGG_RECORD", "ARRAY_NAMES_KEY", "secagg_mod"]

# flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS (a unit test checks they agree)
SECAGG_RECORD = "secaggplus_configs"
ARRAY_NAMES_KEY = "array-names"


def secagg_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Hand SecAgg+ protocol messages to Flower's ``secaggplus_mod``; pass every other message on."""
    if SECAGG_RECORD not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, lambda m, c: _legacy_fit(m, c, call_next))


def _legacy_fit(msg: Message, context: Context, call_next: Any) -> Message:
    """Legacy ``FitIns`` in, edgefed's training handler in between, legacy ``FitRes`` out."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config: dict[str, Any] = dict(fitins.config)
    names = [str(n) for n in json.loads(str(config.pop(ARRAY_NAMES_KEY)))]
    arrays = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    if "proximal_mu" in config:  # the legacy FedProx's key; the message-API one (and our handler) use proximal-mu
        config["proximal-mu"] = float(config.pop("proximal_mu"))
    msg.content.array_records["arrays"] = to_record(arrays)
    msg.content.config_records["config"] = ConfigRecord(config)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = from_record(reply.content.array_records["arrays"])
    metrics: dict[str, Any] = dict(reply.content.metric_records["metrics"])
    info = reply.content.config_records.get("info")
    if info is not None and "region" in info:
        metrics["region"] = str(info["region"])
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters([trained[n] for n in names]),
        num_examples=int(metrics["num-examples"]),
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
