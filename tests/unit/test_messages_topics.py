"""Typed MQTT messages and topic names."""

from __future__ import annotations

import numpy as np
import pytest

from shared import messages, topics
from shared.codec import CodecError, encode_frame
from shared.messages import EscalationAnswer, EscalationRequest, MessageKind


def test_request_round_trip() -> None:
    req = EscalationRequest(request_id="r1", device_id="dev-1", task="elpv", edge_label=1, edge_confidence=0.6,
                            metadata={"line": "A"})
    tensor = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    got, t = messages.decode_request(messages.encode_request(req, tensor))
    assert got == req
    np.testing.assert_array_equal(t, tensor)


def test_answer_round_trip_with_probabilities() -> None:
    ans = EscalationAnswer(request_id="r1", ok=True, label=0, confidence=0.9)
    got, probs = messages.decode_answer(messages.encode_answer(ans, np.array([0.9, 0.1])))
    assert got == ans and probs is not None and probs.dtype == np.float32


def test_request_without_tensor_refused() -> None:
    payload = encode_frame(MessageKind.ESCALATE, {"request_id": "r", "device_id": "d", "task": "t"})
    with pytest.raises(CodecError, match="no tensor"):
        messages.decode_request(payload)


def test_request_with_wrong_kind_refused() -> None:
    payload = messages.encode_answer(EscalationAnswer(request_id="r", ok=True))
    with pytest.raises(CodecError, match="expected an escalation"):
        messages.decode_request(payload)


def test_request_metadata_validated_and_named() -> None:
    payload = encode_frame(MessageKind.ESCALATE, {"request_id": "", "device_id": "d", "task": "t"}, np.zeros(1))
    with pytest.raises(CodecError, match="request_id"):
        messages.decode_request(payload)
    payload = encode_frame(MessageKind.ESCALATE, {"request_id": "r", "device_id": "d", "task": "t", "evil": 1},
                           np.zeros(1))
    with pytest.raises(CodecError, match="evil"):
        messages.decode_request(payload)


def test_topics_follow_the_contract() -> None:
    assert topics.escalate("d1") == "edgefed/v1/d1/escalate"
    assert topics.answer("d1") == "edgefed/v1/d1/answer"
    assert topics.status("d1") == "edgefed/v1/d1/status"
    assert topics.telemetry("d1") == "edgefed/v1/d1/telemetry"
    assert topics.assignment("d1") == "edgefed/v1/d1/assignment"
    assert topics.hub_escalate_subscription() == "$share/hub/edgefed/v1/+/escalate"
    assert topics.device_from_topic("edgefed/v1/line-7/escalate") == "line-7"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "-x", "x" * 129, "a b"])
def test_device_ids_that_could_escape_their_subtree_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        topics.validate_device_id(bad)


@pytest.mark.parametrize("topic", ["other/v1/d/escalate", "edgefed/v1/d", "edgefed/v1/+/escalate"])
def test_foreign_topics_refused(topic: str) -> None:
    with pytest.raises(ValueError):
        topics.device_from_topic(topic)
