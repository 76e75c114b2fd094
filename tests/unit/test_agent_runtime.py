"""The onnxruntime wrapper on real sessions: probabilities, and inputs refused with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.runtime import EdgeRuntime, InputError, ModelError, softmax
from shared.bundle import InputSpec, Manifest, VerifiedBundle, write_bundle
from tests.agent_fixtures import SigningKeys, make_bundle, make_onnx_model, tensor_with_confidence

pytest_plugins = ["tests.agent_fixtures"]


@pytest.fixture
def runtime(bundle_v1: VerifiedBundle) -> EdgeRuntime:
    return EdgeRuntime.load(bundle_v1)


def test_probabilities_follow_the_model(runtime: EdgeRuntime) -> None:
    p = runtime.predict(tensor_with_confidence(0.95, label=1))
    assert p.dtype == np.float32 and p.shape == (1, 2)
    assert p[0] == pytest.approx([0.05, 0.95], abs=1e-4)
    p = runtime.predict(tensor_with_confidence(0.7, label=0))
    assert p[0] == pytest.approx([0.7, 0.3], abs=1e-4)
    assert (runtime.name, runtime.version, runtime.labels) == ("tiny", "1.0.0", ["ok", "defect"])


def test_dynamic_batch_is_accepted(runtime: EdgeRuntime) -> None:
    x = np.concatenate([tensor_with_confidence(0.9, 1), tensor_with_confidence(0.9, 0)])
    p = runtime.predict(x)
    assert p.shape == (2, 2) and int(p[0].argmax()) == 1 and int(p[1].argmax()) == 0


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (np.zeros((1, 1, 4, 4), np.float32), r"shape \[1, 1, 4, 4\].*\[N, 1, 8, 8\]"),
        (np.zeros((1, 8, 8), np.float32), r"3 dimensions"),
        (np.zeros((1, 1, 8, 8), np.float64), r"dtype is float64.*float32"),
        (np.zeros((1, 1, 8, 8), np.uint8), r"dtype is uint8"),
        (np.zeros((0, 1, 8, 8), np.float32), r"batch size is 0"),
        (np.full((1, 1, 8, 8), np.nan, np.float32), r"64 NaN or infinite"),
        (np.where(np.eye(8)[None, None] > 0, np.inf, 0).astype(np.float32), r"8 NaN or infinite"),
    ],
)
def test_bad_inputs_are_refused_before_onnxruntime(runtime: EdgeRuntime, tensor: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        runtime.predict(tensor)


def test_non_array_input(runtime: EdgeRuntime) -> None:
    with pytest.raises(InputError, match="numpy array, got list"):
        runtime.predict([[0.0] * 64])  # type: ignore[arg-type]


def test_fixed_batch_model_refuses_other_batch_sizes(tmp_path: Path, signing_keys: SigningKeys) -> None:
    b = make_bundle(tmp_path / "fixed", signing_keys.private, dynamic_batch=False)
    rt = EdgeRuntime.load(b)
    assert rt.predict(tensor_with_confidence(0.9)).shape == (1, 2)
    with pytest.raises(InputError, match="batch size is 2; the model needs exactly 1"):
        rt.predict(np.zeros((2, 1, 8, 8), np.float32))


def _bundle_with(tmp_path: Path, keys: SigningKeys, model: Path, **manifest: object) -> VerifiedBundle:
    fields: dict[str, object] = dict(
        name="odd",
        version="1",
        task="t",
        created_at="2025-01-01T00:00:00Z",
        input=InputSpec(shape=[1, 1, 8, 8]),
        labels=["a", "b"],
        model_sha256="0" * 64,
        model_size_bytes=0,
    )
    fields.update(manifest)
    return write_bundle(tmp_path / "odd", model, Manifest(**fields), keys.private)  # type: ignore[arg-type]


def test_manifest_contradicting_the_model_is_refused_at_load(tmp_path: Path, signing_keys: SigningKeys) -> None:
    model = make_onnx_model(tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="outputs 2 classes; its manifest lists 3 labels"):
        EdgeRuntime.load(_bundle_with(tmp_path, signing_keys, model, labels=["a", "b", "c"]))
    with pytest.raises(ModelError, match="input is named 'input'; its manifest says 'pixels'"):
        EdgeRuntime.load(
            _bundle_with(tmp_path, signing_keys, model, input=InputSpec(name="pixels", shape=[1, 1, 8, 8]))
        )
    with pytest.raises(ModelError, match=r"dimension 2 is 8; its manifest says shape \[1, 1, 16, 16\]"):
        EdgeRuntime.load(_bundle_with(tmp_path, signing_keys, model, input=InputSpec(shape=[1, 1, 16, 16])))


def test_unloadable_model_file_is_a_model_error(tmp_path: Path, signing_keys: SigningKeys) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not an onnx model")
    with pytest.raises(ModelError, match="onnxruntime cannot load model odd:1"):
        EdgeRuntime.load(_bundle_with(tmp_path, signing_keys, junk))


def test_softmax_is_stable_for_large_logits() -> None:
    p = softmax(np.array([[1000.0, 0.0], [-1000.0, -1000.0]], dtype=np.float32))
    assert np.isfinite(p).all()
    assert p[0] == pytest.approx([1.0, 0.0]) and p[1] == pytest.approx([0.5, 0.5])


def _model_that_fails_at_run(path: Path) -> Path:
    """Loads in onnxruntime, but its Reshape of 64 values to 3×2 fails on every run."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["logits"])],
        "fails-at-run",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [3, 2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_model_that_loads_but_cannot_run_is_refused_at_load(tmp_path: Path, signing_keys: SigningKeys) -> None:
    # The warm-up pass on a zero input runs before the model may serve: a bundle whose model fails on
    # its first inference is refused at load (the agent keeps its old model) instead of failing requests.
    bundle = _bundle_with(tmp_path, signing_keys, _model_that_fails_at_run(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match="model odd:1 loads but fails on a zero input"):
        EdgeRuntime.load(bundle)
