"""Hand-over of a federated edge model: compressed by the model factory into a signed INT8 bundle with the
hub's key, registered with its lineage and its source checkpoint, or, when compression is refused,
nothing registered and nothing left on disk. Real SQLite, real onnxruntime, a Fashion-MNIST slice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cloud_hub.db import Database
from cloud_hub.federation.handover import HandoverError, HandoverPlan, decide_gate, register_result
from cloud_hub.federation.sources import SOURCE_FILE
from cloud_hub.registry import ArtifactStore, RegistryService, TrustedKeys
from federation.spec import FedResult


def _edge_checkpoint(path: Path) -> Path:
    import torch

    from shared.data import get_task
    from shared.models import CheckpointMeta, build_model, save_checkpoint

    task = get_task("fmnist")
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "num_classes": task.num_classes, "width": 4}
    meta = CheckpointMeta(name="global", version="0", role="edge", task="fmnist", arch="edge-cnn", arch_kwargs=kwargs,
                          labels=list(task.labels), input=task.input_spec())
    save_checkpoint(path, meta, build_model("edge-cnn", **kwargs).eval())
    return path


def test_an_edge_model_is_compressed_signed_and_registered_or_nothing_is(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}").open()
    try:
        artifacts = tmp_path / "artifacts"
        registry = RegistryService(db, ArtifactStore(artifacts), TrustedKeys((), tmp_path / "keys"))
        result = FedResult(
            status="finished", global_checkpoint=_edge_checkpoint(tmp_path / "global.pt"),
            rounds=[{"round": 1, "val_accuracy": 0.2}], regions=["north", "south"],
            initial_metrics={"val_accuracy": 0.1}, final_metrics={"val_accuracy": 0.2, "val_loss": float("nan")},
            privacy={"differential_privacy": None},
        )
        gate = decide_gate(result, "val_accuracy", 0.0)
        plan = HandoverPlan(run_id=5, model_name="fm-edge", kind="edge", parent_version="1", strategy="fedprox",
                            flower_run_id="77", signing_key=tmp_path / "keys" / "hub-signing.pem",
                            max_drop_pt=100.0, reference_limit=300)

        info = register_result(registry, artifacts, plan, result, gate)
        assert (info.name, info.version, info.kind, info.parent_version) == ("fm-edge", "1-fed5", "edge", "1")
        assert info.manifest["provenance"]["federation_round"] == "run 5 (Flower run 77)"
        assert info.lineage is not None
        assert info.lineage["federation_run_id"] == 5 and info.lineage["strategy"] == "fedprox"
        assert info.lineage["regions"] == ["north", "south"] and info.lineage["metrics"]["val_loss"] is None
        source = registry.artifact_file(info).parent / SOURCE_FILE
        signed = info.manifest["provenance"]["source_checkpoint_sha256"]
        assert hashlib.sha256(source.read_bytes()).hexdigest() == signed

        # The INT8 gate refuses the next one: nothing is registered and no directory is left behind.
        strict = HandoverPlan(**{**plan.__dict__, "run_id": 6, "max_drop_pt": -100.0})
        with pytest.raises(HandoverError, match="compressing the global model failed: INT8 accuracy"):
            register_result(registry, artifacts, strict, result, gate)
        assert [v.version for v in registry.list_versions("fm-edge")[0]] == ["1-fed5"]
        assert not (artifacts / "fm-edge" / "1-fed6").exists()

        # The same run cannot register twice.
        with pytest.raises(HandoverError, match="fm-edge:1-fed5 is already registered"):
            register_result(registry, artifacts, plan, result, gate)
    finally:
        db.close()
