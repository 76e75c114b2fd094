"""The inference service: batching, result routing, input checks and shutdown, with a real torch model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_hub.errors import Unavailable
from cloud_hub.inference import BadTensor, InferenceService, UnknownTask, load_model
from tests.hub_fixtures import HubModels

pytest_plugins = ["tests.hub_fixtures"]


@pytest.fixture
def service(hub_models: HubModels) -> Iterator[InferenceService]:
    svc = InferenceService("cpu", max_batch_size=4)
    svc.load(hub_models.checkpoint_path)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_queued_requests_run_in_batches_and_each_gets_its_own_result(
    service: InferenceService, hub_models: HubModels
) -> None:
    reference = load_model(hub_models.checkpoint_path)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 1, 32, 32)).astype(np.float32) for _ in range(12)]
    futures = [service.submit("t", x) for x in xs]
    preds = [f.result(timeout=30) for f in futures]
    for x, pred in zip(xs, preds, strict=True):
        expected = reference.predict(x)[0]
        np.testing.assert_allclose(pred.probabilities[0], expected, atol=1e-5)
        assert pred.label_ids == [int(expected.argmax())]
        assert pred.labels == [hub_models.labels[pred.label_ids[0]]]
        assert pred.confidences[0] == pytest.approx(float(expected.max()), abs=1e-5)
        assert (pred.model_name, pred.model_version) == ("t-cloud", "1")
    sizes = [p.batch_size for p in preds]
    assert max(sizes) <= 4
    assert max(sizes) > 1, f"12 queued requests never shared a batch: {sizes}"


def test_multi_sample_requests_are_not_split_or_overfilled(service: InferenceService) -> None:
    a = np.zeros((3, 1, 32, 32), np.float32)
    b = np.ones((3, 1, 32, 32), np.float32)
    pa, pb = service.submit("t", a).result(30), service.submit("t", b).result(30)
    assert pa.probabilities.shape == (3, 2) and pb.probabilities.shape == (3, 2)
    assert pa.batch_size == 3 and pb.batch_size == 3  # 3 + 3 > max_batch_size 4
    np.testing.assert_allclose(pa.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # A single C×H×W sample is accepted as a batch of one.
    assert service.submit("t", np.zeros((1, 32, 32), np.float32)).result(30).probabilities.shape == (1, 2)


def test_bad_requests_are_refused_at_submit(service: InferenceService) -> None:
    with pytest.raises(UnknownTask, match="no cloud model is loaded for task 'nope' \\(loaded: 't'\\)"):
        service.submit("nope", np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(BadTensor, match=r"shape \[1, 1, 16, 16\] does not fit model t-cloud:1") as info:
        service.submit("t", np.zeros((1, 1, 16, 16), np.float32))
    assert info.value.kind == "bad_shape"
    with pytest.raises(BadTensor, match="dtype is float64") as info:
        service.submit("t", np.zeros((1, 1, 32, 32), np.float64))
    assert info.value.kind == "bad_dtype"
    with pytest.raises(BadTensor):
        service.submit("t", np.zeros((0, 1, 32, 32), np.float32))
    # Still serving afterwards.
    assert service.submit("t", np.zeros((1, 1, 32, 32), np.float32)).result(30).batch_size == 1


def test_loading_a_new_version_swaps_the_active_model(
    service: InferenceService, hub_models: HubModels, tmp_path: Path
) -> None:
    v2 = hub_models.make_checkpoint("2", tmp_path / "v2.pt")
    spec = service.load(v2)
    assert (spec.name, spec.version, spec.task) == ("t-cloud", "2", "t")
    assert service.specs()["t"].version == "2"
    assert service.submit("t", np.zeros((1, 1, 32, 32), np.float32)).result(30).model_version == "2"


def test_stopped_service_refuses_new_requests(hub_models: HubModels) -> None:
    svc = InferenceService("cpu", max_batch_size=2)
    svc.load(hub_models.checkpoint_path)
    with pytest.raises(Unavailable, match="not running"):
        svc.submit("t", np.zeros((1, 1, 32, 32), np.float32))
    svc.start()
    assert svc.submit("t", np.zeros((1, 1, 32, 32), np.float32)).result(30).batch_size == 1
    svc.stop()
    with pytest.raises(Unavailable):
        svc.submit("t", np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        InferenceService("cpu", max_batch_size=0)
