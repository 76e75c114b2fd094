"""The model factory end to end on a small ELPV slice: train, compress, verify, gate, CLI.

Real torch training, real ONNX export, real onnxruntime quantization and sessions; the slice
(200 cells at 32x32, one cloud epoch) keeps the whole file to a few tens of seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
        (ref.cloud_checkpoint, "cloud", "cloud-resnet"),
        (ref.edge_checkpoint, "edge", "edge-cnn"),
    ):
        ck = load_checkpoint(path)
        assert (ck.meta.role, ck.meta.arch, ck.meta.task) == (role, arch, "elpv")
        assert ck.meta.name == f"elpv-{role}" and ck.meta.version == "1"
        assert ck.meta.labels == ["functional", "defective"]
        assert ck.meta.input.shape == [1, 1, 32, 32]
        assert ck.meta.input.mean == [pytest.approx(0.5971)]
        assert 0.0 <= ck.meta.metrics["test_accuracy"] <= 1.0
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


def test_cli_and_data_modules_do_not_import_torch_or_onnxruntime() -> None:
    code = (
        "import sys, cloud_hub.factory.cli, shared.data, shared.data.preprocess;"
        "bad = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
