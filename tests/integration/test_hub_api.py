"""The hub's REST API on a real hub process: registry, artifacts, devices, predict, auth, CLI."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import typer
from typer.testing import CliRunner

from cloud_hub.cli import device_app, list_models, push
from shared.bundle import load_public_key, open_bundle, pack_bundle, unpack_bundle
from shared.codec import encode_frame
from shared.hub_client import HubError
from tests.hub_fixtures import HubModels, HubProcess

pytest_plugins = ["tests.hub_fixtures"]
pytestmark = pytest.mark.integration


def _tamper(bundle_dir: Path, out: Path) -> bytes:
    shutil.copytree(bundle_dir, out)
    model = out / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    return pack_bundle(out)


def test_push_list_and_download_with_device_tokens(
    module_hub: HubProcess, hub_models: HubModels, tmp_path: Path
) -> None:
    with module_hub.client() as admin:
        models = {m.name: m for m in admin.list_models().data}
        assert models["t-edge"].kind == "edge" and models["t-cloud"].kind == "cloud"
        versions = admin.list_versions("t-edge")
        assert versions.count >= 1 and versions.data[-1].version == "1"
        token = admin.register_device("api-dl-1", "north").token
    with module_hub.client(token) as device:
        archive = device.download_artifact("t-edge", "1")
        cloud = device.download_artifact("t-cloud", "1")
    # A version's sha256 is its model file's (as signed); the download carries the archive's own.
    assert versions.data[-1].sha256 == hub_models.make_bundle("x", tmp_path / "x").manifest.model_sha256
    assert cloud == hub_models.checkpoint_path.read_bytes()
    # What a device downloads verifies and runs in onnxruntime.
    bundle = open_bundle(
        unpack_bundle(archive, tmp_path / "dl"), [load_public_key(hub_models.public_key_path)]
    )
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.zeros((2, 1, 32, 32), np.float32)})
    assert logits.shape == (2, 2)

    path = "/api/v1/models/t-edge/versions/1/artifact"
    with module_hub.http(token) as http:
        r = http.get(path)
        assert r.headers["content-type"] == "application/gzip"
        assert r.headers["x-edgefed-sha256"] == hashlib.sha256(archive).hexdigest()
        assert http.get("/api/v1/models/t-edge/versions/99/artifact").status_code == 404
    with module_hub.http("") as anonymous:
        r = anonymous.get(path)
        assert r.status_code == 401 and "missing bearer token" in r.json()["detail"]
        assert anonymous.get("/api/v1/models").status_code == 401
        keys = anonymous.get("/api/v1/keys").json()["keys"]  # public
        assert hub_models.public_key_path.read_text().strip() in [k.strip() for k in keys]
    with module_hub.http("not-a-token") as wrong:
        r = wrong.get(path)
        assert r.status_code == 401 and "not valid" in r.json()["detail"]


def test_tampered_unsigned_and_duplicate_bundles_are_refused(
    module_hub: HubProcess, hub_models: HubModels, tmp_path: Path
) -> None:
    with module_hub.client() as admin:
        tampered = _tamper(hub_models.make_bundle("tamper-1", tmp_path / "src").path, tmp_path / "tampered")
        with pytest.raises(HubError, match="SHA-256 of model.onnx") as info:
            admin.push_bundle(tampered)
        assert info.value.status == 400
        assert "tamper-1" not in [v.version for v in admin.list_versions("t-edge").data]
        assert not (module_hub.data_dir / "artifacts" / "t-edge" / "tamper-1").exists()

        with pytest.raises(HubError, match="already registered") as info:
            admin.push_bundle(hub_models.bundle_archive)
        assert info.value.status == 409
        with pytest.raises(HubError, match="not a readable tar.gz") as info:
            admin.push_bundle(b"\x1f\x8bgarbage")
        assert info.value.status == 400
        with pytest.raises(HubError, match="not a readable edgefed checkpoint") as info:
            admin.push_checkpoint(_write(tmp_path / "bad.pt", b"nope"))
        assert info.value.status == 400

        pushed = admin.push_bundle(
            pack_bundle(hub_models.make_bundle("api-2", tmp_path / "v2", parent_version="1").path)
        )
        assert (pushed.version, pushed.parent_version, pushed.kind) == ("api-2", "1", "edge")
        token = admin.register_device("api-push-1").token
    with module_hub.client(token) as device, pytest.raises(HubError, match="needs the admin token") as info:
        device.push_bundle(hub_models.bundle_archive)
    assert info.value.status == 403


def test_devices_register_read_assignment_and_running(
    module_hub: HubProcess, hub_models: HubModels, tmp_path: Path
) -> None:
    with module_hub.client() as admin:
        token = admin.register_device("api-dev-1", "south").token
        other = admin.register_device("api-dev-2", "south").token
        lonely = admin.register_device("api-dev-3", "south", model_name="no-such-model").token
        with pytest.raises(HubError, match="already registered") as info:
            admin.register_device("api-dev-1")
        assert info.value.status == 409
        with pytest.raises(HubError) as info:
            admin._request("POST", "/api/v1/devices", json={"device_id": "bad/id"})
        assert info.value.status == 422 and "device_id" in str(info.value)
        assert {"api-dev-1", "api-dev-2"} <= {d.device_id for d in admin.list_devices().data}
        latest = admin.list_versions("t-edge").data[0]

    with module_hub.client(token) as device:
        me = device.get_device("api-dev-1")
        assert me.region == "south" and me.model_name == "t-edge" and me.running_version is None
        assignment = device.get_assignment("api-dev-1")
        assert (assignment.model_name, assignment.version, assignment.sha256) == (
            "t-edge",
            latest.version,
            latest.sha256,
        )
        device.report_running("api-dev-1", "t-edge", "1")
        assert device.get_device("api-dev-1").running_version == "1"
        assert device.get_device("api-dev-1").last_seen is not None
        for call in (
            lambda: device.get_device("api-dev-2"),
            lambda: device.get_assignment("api-dev-2"),
            lambda: device.report_running("api-dev-2", "t-edge", "1"),
            device.list_devices,
        ):
            with pytest.raises(HubError) as info:
                call()
            assert info.value.status == 403
        with pytest.raises(HubError, match="has no version '77'") as info:
            device.report_running("api-dev-1", "t-edge", "77")
        assert info.value.status == 404
        assert device.get_device("api-dev-1").running_version == "1"
    with module_hub.client(other) as device2:
        assert device2.get_assignment("api-dev-2").model_name == "t-edge"
    with (
        module_hub.client(lonely) as device3,
        pytest.raises(HubError, match="no registered version yet") as info,
    ):
        device3.get_assignment("api-dev-3")
    assert info.value.status == 404


def test_predict_over_rest_good_and_bad_input(module_hub: HubProcess) -> None:
    x = np.random.default_rng(1).standard_normal((3, 1, 32, 32)).astype(np.float32)
    with module_hub.http() as http:
        r = http.post("/api/v1/predict", content=encode_frame(0, {"task": "t"}, x))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["labels"]) == 3 and set(body["labels"]) <= {0, 1}
        assert body["label_names"] == [["a", "b"][i] for i in body["labels"]]
        probs = np.array(body["probabilities"])
        assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
        assert body["confidences"] == pytest.approx(probs.max(axis=1).tolist())
        assert (body["model_name"], body["model_version"]) == ("t-cloud", "1")

        bad = {
            b"garbage bytes": (400, "bad magic"),
            encode_frame(0, {"task": "t"}, x)[:-10]: (400, "tensor data is"),
            encode_frame(0, {}, x): (400, '"task"'),
            encode_frame(0, {"task": "t"}): (400, "carries no tensor"),
            encode_frame(0, {"task": "t"}, x[:, :, :16, :16]): (400, "does not fit model t-cloud:1"),
            encode_frame(0, {"task": "t"}, x.astype(np.float64)): (400, "float64"),
            encode_frame(0, {"task": "zzz"}, x): (404, "no cloud model is loaded for task 'zzz'"),
        }
        for payload, (status, needle) in bad.items():
            r = http.post("/api/v1/predict", content=payload)
            assert r.status_code == status and needle in r.json()["detail"], (needle, r.status_code, r.text)
        assert http.get("/healthz").status_code == 200
        assert http.post("/api/v1/predict", content=encode_frame(0, {"task": "t"}, x)).status_code == 200
    assert httpx.post(f"{module_hub.base_url}/api/v1/predict", content=b"").status_code == 401


def test_cli_push_list_and_device_commands(
    module_hub: HubProcess, hub_models: HubModels, tmp_path: Path
) -> None:
    app = typer.Typer()
    app.command("push")(push)
    app.command("list")(list_models)
    app.add_typer(device_app, name="device")
    env = {"EDGEFED_HUB_URL": module_hub.base_url, "EDGEFED_ADMIN_TOKEN": module_hub.admin_token}
    runner = CliRunner()

    bundle_dir = hub_models.make_bundle("cli-dir", tmp_path / "dir").path
    archive = tmp_path / "b.tar.gz"
    archive.write_bytes(pack_bundle(hub_models.make_bundle("cli-tgz", tmp_path / "tgz").path))
    ckpt = hub_models.make_checkpoint("cli-pt", tmp_path / "c.pt")
    for path, expect in (
        (bundle_dir, "t-edge:cli-dir (edge"),
        (archive, "t-edge:cli-tgz (edge"),
        (ckpt, "t-cloud:cli-pt (cloud"),
    ):
        result = runner.invoke(app, ["push", str(path)], env=env)
        assert result.exit_code == 0 and expect in result.output, result.output

    result = runner.invoke(app, ["list"], env=env)
    assert result.exit_code == 0 and "cli-tgz" in result.output and "cli-pt" in result.output
    result = runner.invoke(app, ["device", "register", "cli-dev-1", "--region", "west"], env=env)
    token = result.output.strip()
    assert result.exit_code == 0 and len(token) > 30
    with module_hub.client(token) as device:
        assert device.get_device("cli-dev-1").region == "west"
    result = runner.invoke(app, ["device", "list"], env=env)
    assert result.exit_code == 0 and "cli-dev-1" in result.output and "west" in result.output

    result = runner.invoke(app, ["push", str(archive)], env=env)
    assert result.exit_code == 1 and "error: " in result.output and "HTTP 409" in result.output
    result = runner.invoke(app, ["list", "--token", "wrong"], env=env)
    assert result.exit_code == 1 and "HTTP 401" in result.output
    result = runner.invoke(app, ["push", str(tmp_path / "missing.pt")], env=env)
    assert result.exit_code == 1 and "does not exist" in result.output
    # The cloud checkpoint pushed over the CLI is now the active model for its task.
    with module_hub.http() as http:
        assert http.get("/readyz").json()["models"] == {"t": "t-cloud:cli-pt"}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
