"""The model factory end to end on a small ELPV slice: train, compress, verify, gate, CLI.

Real torch training, real ONNX export, real onnxruntime quantization and sessions; the slice
(200 cells at 32x32, one cloud epoch) keeps the whole file to a few tens of seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cloud_hub.factory import (
    AccuracyGateError,
    BundleExistsError,
    build_reference_models,
    compress_checkpoint,
)
from cloud_hub.factory.cli import compress as compress_cmd
from shared.bundle import BundleError, load_public_key, open_bundle
from shared.data import load_task, task_split, to_model_input

SLICE = {"epochs": 1, "resolution": 32, "limit": 200}


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    work = tmp_path_factory.mktemp("factory")
    # A ~40-item holdout moves 2.5 pt per item, so the gate is opened here; test_gate_* closes it.
    return build_reference_models(
        work / "models", "elpv", signing_key=work / "keys" / "sign.pem", max_drop_pt=100.0, **SLICE
    )


def test_training_writes_both_checkpoints_with_metadata(ref) -> None:  # noqa: ANN001
    from shared.models import load_checkpoint

    for path, role, arch in (
        (ref.cloud_checkpoint, "cloud", "cloud-cnn"),
        (ref.edge_checkpoint, "edge", "edge-cnn"),
    ):
        ck = load_checkpoint(path)
        assert (ck.meta.role, ck.meta.arch, ck.meta.task) == (role, arch, "elpv")
        assert ck.meta.name == f"elpv-{role}" and ck.meta.version == "1"
        assert ck.meta.labels == ["functional", "defective"]
        assert ck.meta.input.shape == [1, 1, 32, 32]
        assert ck.meta.input.mean == [pytest.approx(0.5971)]
        assert 0.0 <= ck.meta.metrics["test_accuracy"] <= 1.0
        # The cloud model averages over flips itself, so every consumer of the checkpoint gets it.
        assert ck.meta.arch_kwargs.get("tta") == ("flips" if role == "cloud" else None)
    assert (ref.cloud_checkpoint.parent / "train_metrics.json").is_file()


def test_bundle_verifies_and_runs_with_its_own_input_spec(ref) -> None:  # noqa: ANN001
    import onnxruntime as ort

    assert ref.public_key.name == "sign.pub"
    bundle = open_bundle(ref.bundle.path, [load_public_key(ref.public_key)])
    m = bundle.manifest
    assert (m.name, m.version, m.task, m.labels) == ("elpv-edge", "1", "elpv", ["functional", "defective"])
    assert m.input.name == "input" and m.input.shape == [1, 1, 32, 32]
    met = m.metrics
    ds = load_task("elpv", 32, limit=200)
    test = task_split(ds).test
    assert met.holdout_size == len(test) > 30
    assert met.int8_size_bytes == m.model_size_bytes < 0.5 * met.fp32_size_bytes
    assert met.fp32_latency_ms > 0 and met.int8_latency_ms > 0
    q = met.calibration_confidence_quantiles
    assert q is not None and len(q) == 101 and q[0] >= 0.5 and q[-1] <= 1.0 and q == sorted(q)
    for q in (met.calibration_margin_quantiles, met.calibration_entropy_quantiles):
        assert q is not None and len(q) == 101 and 0.0 <= q[0] <= q[-1] <= 1.0 and q == sorted(q)
    assert m.provenance.source_checkpoint_sha256 and m.provenance.architecture == "edge-cnn"
    assert m.provenance.compression["per_channel"] is True

    # The bundle's own accuracy claim holds when the edge path feeds it: preprocess + onnxruntime.
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    x = to_model_input(ds.images[test], m.input)
    logits = session.run(None, {m.input.name: x})[0]
    assert logits.shape == (len(test), 2)
    assert np.mean(logits.argmax(1) == ds.labels[test]) == pytest.approx(met.int8_accuracy, abs=1e-6)
    one = session.run(None, {m.input.name: to_model_input(ds.images[test[0]], m.input)})[0]
    assert one.shape == (1, 2)


def test_reference_models_are_reused_when_settings_match(ref) -> None:  # noqa: ANN001
    work = ref.cloud_checkpoint.parent
    before = (ref.cloud_checkpoint.stat().st_mtime_ns, ref.edge_checkpoint.stat().st_mtime_ns)
    again = build_reference_models(
        work, "elpv", signing_key=work.parent / "keys" / "sign.pem", max_drop_pt=100.0, **SLICE
    )
    assert (again.cloud_checkpoint.stat().st_mtime_ns, again.edge_checkpoint.stat().st_mtime_ns) == before
    assert again.bundle.manifest.signature == ref.bundle.manifest.signature
    # The recipe is part of the cache key: checkpoints trained under other defaults are not reused.
    from cloud_hub.factory.train import TrainConfig

    assert json.loads((work / "reference.json").read_text())["recipe"] == asdict(TrainConfig())


def test_compress_sets_identity_and_refuses_nonempty_output(ref, tmp_path: Path) -> None:  # noqa: ANN001
    key = tmp_path / "new" / "factory.pem"
    b = compress_checkpoint(
        ref.edge_checkpoint,
        tmp_path / "b",
        key,
        name="cells",
        version="7",
        parent_version="6",
        max_drop_pt=100.0,
        limit=200,
        latency_runs=5,
    )
    assert key.is_file() and key.with_suffix(".pub").is_file()  # created on first use
    assert (b.manifest.name, b.manifest.version, b.manifest.parent_version) == ("cells", "7", "6")
    open_bundle(b.path, [load_public_key(key.with_suffix(".pub"))])
    with pytest.raises(BundleError, match="does not verify"):
        open_bundle(b.path, [load_public_key(ref.public_key)])  # another key did not sign it
    with pytest.raises(BundleExistsError, match="not an empty directory"):
        compress_checkpoint(ref.edge_checkpoint, b.path, key, max_drop_pt=100.0, limit=200, latency_runs=5)


def test_gate_refuses_and_writes_no_bundle(ref, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "out" / "bundle"
    with pytest.raises(AccuracyGateError, match=r"above the gate of -100 pt; no bundle was written") as info:
        compress_checkpoint(ref.edge_checkpoint, out, tmp_path / "k.pem", max_drop_pt=-100.0, limit=200, latency_runs=5)
    assert 0.0 <= info.value.int8_accuracy <= 1.0 and info.value.max_drop_pt == -100.0
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_cli_compress_exits_nonzero_with_one_line_error_on_gate(ref, tmp_path: Path) -> None:  # noqa: ANN001
    app = typer.Typer()
    app.command()(compress_cmd)
    args = ["--signing-key", str(tmp_path / "k.pem"), "--checkpoint", str(ref.edge_checkpoint), "--limit", "200"]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "no"), "--max-drop", "-100"])
    assert refused.exit_code == 1
    assert refused.output.strip().startswith("error: INT8 accuracy") and "gate" in refused.output
    assert not (tmp_path / "no").exists()
    ok = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "yes"), "--max-drop", "100", "--version", "2"])
    assert ok.exit_code == 0, ok.output
    assert "bundle elpv-edge:2" in ok.output and "latency ms" in ok.output
    missing = CliRunner().invoke(app, ["--signing-key", str(tmp_path / "k.pem"), "--checkpoint", "nope.pt"])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def _optimised_ops(model: Path, tmp_path: Path) -> set[str]:
    """Op types of the graph onnxruntime actually runs (full optimisation, as the agent's session)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / f"opt-{model.parent.name}.onnx")
    ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}


def test_default_int8_is_integer_operators_and_qdq_fuses_into_the_same(ref, tmp_path: Path) -> None:  # noqa: ANN001
    import onnx

    # Default (QOperator): the file holds the integer kernels themselves; only the input is quantized
    # and only the logits dequantized.
    m = ref.bundle.manifest
    assert m.provenance.compression["quant_format"] == "QOperator"
    file_ops = [n.op_type for n in onnx.load(ref.bundle.model_path).graph.node]
    assert file_ops.count("QLinearConv") == 4 and "QGemm" in file_ops and "QLinearGlobalAveragePool" in file_ops
    assert file_ops.count("QuantizeLinear") == 1 and file_ops.count("DequantizeLinear") == 1
    assert not {"Conv", "Gemm", "GlobalAveragePool"} & set(file_ops)
    # QDQ on request: float ops wrapped in Q/DQ pairs on disk, fused at load into the same integer kernels.
    qdq = compress_checkpoint(ref.edge_checkpoint, tmp_path / "qdq", tmp_path / "k.pem", max_drop_pt=100.0,
                              limit=200, latency_runs=5, quant_format="QDQ")
    assert qdq.manifest.provenance.compression["quant_format"] == "QDQ"
    qdq_ops = [n.op_type for n in onnx.load(qdq.model_path).graph.node]
    assert qdq_ops.count("Conv") == 4 and qdq_ops.count("DequantizeLinear") > 4
    fused = _optimised_ops(qdq.model_path, tmp_path)
    assert "QLinearConv" in fused and not {"Conv", "Gemm"} & fused
    assert _optimised_ops(ref.bundle.model_path, tmp_path) >= {"QLinearConv", "QGemm"}
    # Same network, same arithmetic: same size class, identical accuracy; the QOperator file is smaller.
    assert m.model_size_bytes < qdq.manifest.model_size_bytes
    assert m.metrics.int8_accuracy == pytest.approx(qdq.manifest.metrics.int8_accuracy, abs=0.03)


def test_unknown_quant_format_is_refused_naming_the_choices(ref, tmp_path: Path) -> None:  # noqa: ANN001
    app = typer.Typer()
    app.command()(compress_cmd)
    r = CliRunner().invoke(app, ["--signing-key", str(tmp_path / "k.pem"), "--checkpoint", str(ref.edge_checkpoint),
                                 "--out", str(tmp_path / "b"), "--quant-format", "QInt4"])
    assert r.exit_code == 1 and "--quant-format 'QInt4' is not one of QOperator, QDQ" in r.output
    assert not (tmp_path / "b").exists()


def test_cli_and_data_modules_do_not_import_torch_or_onnxruntime() -> None:
    code = (
        "import sys, cloud_hub.factory.cli, shared.data, shared.data.preprocess;"
        "bad = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr


def test_dihedral_views_are_the_eight_symmetries_of_a_square() -> None:
    import torch

    from shared.models.networks import TTA_VIEWS, dihedral

    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [dihedral(x, v) for v in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(dihedral(x, 1), torch.rot90(x, 1, dims=(-2, -1)))
    # "flips" is the subgroup that keeps a cell upright: identity, both flips and their product.
    flips = {tuple(dihedral(x, v).flatten().tolist()) for v in TTA_VIEWS["flips"]}
    assert flips == {tuple(t.flatten().tolist()) for t in (x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2))}
    with pytest.raises(ValueError, match="between 0 and 7"):
        dihedral(x, 8)


def test_cloud_tta_output_is_invariant_under_its_views_and_only_in_eval() -> None:
    import torch

    from shared.models import build_model

    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    net = build_model("cloud-resnet", width=4, tta="dihedral", pool="avgmax").eval()
    out = net(x)
    assert out.shape == (3, 2)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))  # log of averaged probabilities
    torch.testing.assert_close(net(torch.rot90(x, 1, dims=(-2, -1))), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(x.transpose(-2, -1)), out, atol=1e-5, rtol=1e-5)
    flips = build_model("cloud-resnet", width=4, tta="flips").eval()
    torch.testing.assert_close(flips(x.flip(-1)), flips(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flips(x.flip(-2)), flips(x), atol=1e-5, rtol=1e-5)
    plain = build_model("cloud-resnet", width=4).eval()
    assert not torch.allclose(plain(x.flip(-1)), plain(x), atol=1e-5)  # the test can fail
    net.train()
    assert net(x).shape == (3, 2) and not torch.allclose(net(x).logsumexp(1), torch.zeros(3))
    with pytest.raises(ValueError, match="tta must be one of"):
        build_model("cloud-resnet", tta="rotations")
    with pytest.raises(ValueError, match="pool must be"):
        build_model("cloud-resnet", pool="median")


def test_tta_checkpoint_reloads_with_weights_only(tmp_path: Path) -> None:
    import torch

    from shared.bundle import InputSpec
    from shared.models import CheckpointMeta, build_model, load_checkpoint, save_checkpoint

    kwargs = {"in_channels": 1, "num_classes": 2, "width": 4, "tta": "flips", "pool": "avgmax"}
    net = build_model("cloud-resnet", **kwargs).eval()
    meta = CheckpointMeta(
        name="c", version="1", role="cloud", task="elpv", arch="cloud-resnet", arch_kwargs=kwargs,
        labels=["functional", "defective"], input=InputSpec(shape=[1, 1, 16, 16]),
    )
    save_checkpoint(tmp_path / "c.pt", meta, net)
    back = load_checkpoint(tmp_path / "c.pt")  # torch.load(weights_only=True) inside
    x = torch.randn(2, 1, 16, 16)
    assert back.model.tta == "flips"
    torch.testing.assert_close(back.model(x), net(x))


def test_affine_augmentation_is_identity_at_zero_and_seeded() -> None:
    import torch

    from cloud_hub.factory.train import _affine, _augment_views

    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(_affine(x, 0.0, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)
    a = _affine(x, 2.0, 10.0, torch.Generator().manual_seed(1))
    b = _affine(x, 2.0, 10.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    views = torch.tensor([0, 5, 7, 2])
    out = _augment_views(x, views)
    for item, expected in zip(out, (x[0], x[1].flip(-1), x[2].flip(-2), x[3].flip(-1).flip(-2)), strict=True):
        assert torch.equal(item, expected)
