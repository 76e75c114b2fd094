"""The hub's CPU runtime: the cloud model in onnxruntime, accepted only when it matches PyTorch."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cloud_hub.inference import load_model
from cloud_hub.inference.cpu_runtime import OrtRunner, RuntimeUnavailable, cpu_threads
from cloud_hub.inference.model import LoadedModel, ModelSpec
from tests.hub_fixtures import HubModels

pytest_plugins = ["tests.hub_fixtures"]

SPEC = ModelSpec(name="m", version="1", task="t", labels=("a", "b", "c"), input_chw=(1, 8, 8))


class _BatchDependent(torch.nn.Module):
    """Python control flow on the batch size: tracing bakes in one branch, so the export differs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return y if x.shape[0] <= 2 else -y


def test_the_cloud_checkpoint_runs_in_onnxruntime_with_pytorchs_probabilities(hub_models: HubModels) -> None:
    ort_model = load_model(hub_models.checkpoint_path)  # the hub's default on a CPU
    torch_model = load_model(hub_models.checkpoint_path, cpu_runtime="torch")
    assert ort_model.runtime == "onnxruntime" and torch_model.runtime == "torch"
    rng = np.random.default_rng(1)
    for n in (1, 3, 17):
        x = rng.standard_normal((n, 1, 32, 32)).astype(np.float32)
        got, want = ort_model.predict(x), torch_model.predict(x)
        assert got.shape == want.shape == (n, 2)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_a_network_whose_export_differs_is_served_by_pytorch_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = _BatchDependent().eval()
    with pytest.raises(RuntimeUnavailable, match="differ from PyTorch's"):
        OrtRunner.from_module(net, SPEC.input_chw, threads=1)
    with caplog.at_level(logging.WARNING, logger="cloud_hub.inference.model"):
        model = LoadedModel(net, SPEC, "cpu", cpu_runtime="onnxruntime")
    assert model.runtime == "torch"
    assert "runs in PyTorch on the CPU" in caplog.text and "differ" in caplog.text
    x = np.random.default_rng(2).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        expected = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-6)  # the fallback computes the real thing


def test_unknown_cpu_runtime_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="cpu_runtime must be one of onnxruntime, torch"):
        LoadedModel(_BatchDependent(), SPEC, "cpu", cpu_runtime="tensorrt")


def test_cpu_threads_default_is_half_the_usable_cores() -> None:
    assert cpu_threads(3) == 3
    assert 1 <= cpu_threads(0) <= max(1, len(__import__("os").sched_getaffinity(0)))
