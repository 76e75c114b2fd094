"""Federation through the hub on real parts: ``edgefed hub serve`` submits to a real SuperLink with two
real SuperNodes (regions north and south, each with an edge agent's learning store), over SQLite.

One module-wide deployment; the runs are kept to one round on 32 cases per region so the module
stays within about a minute and a half on two cores.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from federation.processes import FlowerDeployment
from shared.broker import DevBroker
from shared.hub_client import HubClient
from shared.processes import free_port
from tests.fed_fixtures import make_edge_checkpoint, make_reference, make_regions
from tests.hub_fixtures import HubModels, HubProcess

pytest_plugins = ["tests.hub_fixtures"]
# A Flower run starts a ServerApp and a ClientApp per region, each importing torch: about 90 s for the
# main test on an idle 2-core machine, several minutes when other suites share the cores.
pytestmark = pytest.mark.timeout(900)


@dataclass
class FedHub:
    hub: HubProcess
    flower: FlowerDeployment
    reference: Path
    edge_source: Path


def _port_outside_ephemeral_range() -> int:
    """A free port below Linux's ephemeral range (32768+): the hub restarts on the same port, and while it
    is down the SuperNodes' many outgoing connections could otherwise take that port as their own."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@pytest.fixture(scope="module")
def fed_hub(
    session_broker: DevBroker, hub_models: HubModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FedHub]:
    root = tmp_path_factory.mktemp("fed-hub")
    flower = FlowerDeployment(root / "flower", make_regions(root, ["north", "south"], n=32)).start()
    hub = HubProcess(
        root / "hub",
        session_broker.url,
        public_keys=[hub_models.public_key_path],
        default_model=hub_models.edge_name,
        extra_args=["--superlink", flower.address, "--fed-poll", "1"],
        port=_port_outside_ephemeral_range(),
    )
    try:
        hub.start(timeout=180)
        # A generous timeout: the first push loads and probes a model while SuperNodes start beside it.
        with HubClient(hub.base_url, hub.admin_token, timeout=180) as client:
            client.push_checkpoint(hub_models.checkpoint_path)
            client.push_bundle(hub_models.bundle_archive)
        yield FedHub(hub, flower, make_reference(root / "reference.npz"), make_edge_checkpoint(root / "edge.pt"))
    finally:
        hub.stop()
        flower.stop()


def _wait(http: httpx.Client, run_id: int, until: tuple[str, ...], timeout: float = 400.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = http.get(f"/api/v1/federation/rounds/{run_id}").json()
        if run["status"] in until or (until == ("submitted",) and run["flower_run_id"]):
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {run['status']} after {timeout:g} s: {run}")
        time.sleep(0.5)


def _http(hub: HubProcess, token: str | None = None) -> httpx.Client:
    """Like ``hub.http()`` with room for a loaded CI machine (the first call imports Flower in the hub)."""
    token = hub.admin_token if token is None else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=hub.base_url, headers=headers, timeout=120)


def _edgefed(*args: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys; sys.argv = ['edgefed', *{list(args)!r}]; from shared.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_a_round_runs_on_flower_and_registers_a_version_with_lineage_across_a_hub_restart(fed_hub: FedHub) -> None:
    hub = fed_hub.hub
    common = {"reference_data": str(fed_hub.reference), "rounds": 1, "fraction_evaluate": 0.0, "batch_size": 16}
    with _http(hub) as http:
        r = http.post("/api/v1/federation/rounds", json={
            "model_name": "t-cloud", "min_available": 2, "min_fit": 2, "gate_min_improvement_pt": -100, **common})
        assert r.status_code == 202, r.text
        run = r.json()
        assert run["status"] == "queued" and run["parent_version"] == "1" and run["kind"] == "cloud"

        # One run per model at a time: the second is refused naming the first.
        again = http.post("/api/v1/federation/rounds", json={"model_name": "t-cloud", **common})
        assert again.status_code == 409
        assert f"already has federation run {run['id']}" in again.json()["detail"]

        # A run of another model that Flower fails: three regions are needed, two are connected.
        assert http.put("/api/v1/federation/sources/t-edge/1", content=fed_hub.edge_source.read_bytes()).status_code \
            == 204
        doomed = http.post("/api/v1/federation/rounds", json={
            "model_name": "t-edge", "min_available": 3, "round_timeout_s": 3, **common}).json()

        # The hub restarts while Flower runs the round; it picks the run up again.
        _wait(http, run["id"], ("submitted",))
    hub.restart(timeout=180)
    with _http(hub) as http:
        done = _wait(http, run["id"], ("finished", "failed"))
        assert done["status"] == "finished", done
        assert done["result"] == "registered" and done["result_versions"] == ["t-cloud:1-fed1"]
        assert sorted(done["regions"]) == ["north", "south"]
        assert [r["round"] for r in done["rounds"]] == [1] and "val_accuracy" in done["rounds"][0]
        assert done["gate"]["passed"] is True and done["gate"]["metric"] == "val_accuracy"
        assert done["final_metrics"]["val_accuracy"] == done["gate"]["candidate"]

        version = http.get("/api/v1/models/t-cloud/versions/1-fed1").json()
        assert version["parent_version"] == "1"
        lineage = version["lineage"]
        assert lineage["federation_run_id"] == run["id"] and lineage["flower_run_id"] == done["flower_run_id"]
        assert lineage["strategy"] == "fedavg" and sorted(lineage["regions"]) == ["north", "south"]
        assert lineage["round"] == 1 and lineage["metrics"]["val_accuracy"] == done["gate"]["candidate"]

        failed = _wait(http, doomed["id"], ("finished", "failed"))
        assert failed["status"] == "failed"
        assert "only 2 SuperNode(s) connected within 3 s; the run needs 3" in failed["reason"], failed
        assert failed["result_versions"] == []
        assert [v["version"] for v in http.get("/api/v1/models/t-edge/versions").json()["data"]] == ["1"]
    assert "resuming federation run" in hub.log_tail(400)

    status = _edgefed("fed", "status", str(run["id"]), "--hub", hub.base_url, "--admin-token", hub.admin_token)
    assert status.returncode == 0, status.stderr
    assert "finished (registered)" in status.stdout and "t-cloud:1-fed1" in status.stdout
    listing = _edgefed("fed", "status", "--hub", hub.base_url, "--admin-token", hub.admin_token)
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert " failed " in rows[str(doomed["id"])] and " registered " in rows[str(run["id"])]


def test_bad_requests_name_the_problem_and_change_nothing(fed_hub: FedHub, hub_models: HubModels) -> None:
    hub = fed_hub.hub
    ref = str(fed_hub.reference)
    with _http(hub) as http:
        before = http.get("/api/v1/federation/rounds").json()["count"]
        cases = [
            ({"model_name": "nope"}, 404, "no model named 'nope'"),
            ({"model_name": "t-cloud", "version": "9", "reference_data": ref}, 404, "has no version '9'"),
            ({"model_name": "t-cloud", "strategy": "fedbest", "reference_data": ref}, 400, "unknown strategy"),
            ({"model_name": "t-cloud", "strategy_params": {"warp": 1}, "reference_data": ref}, 400, "warp"),
            ({"model_name": "t-cloud"}, 400, "task 't', which has no reference set"),
            ({"model_name": "t-cloud", "reference_data": "/no/such.npz"}, 400, "is not a file on the hub"),
            ({"model_name": "t-cloud", "rounds": 0}, 422, "rounds"),
            ({"model_name": "t-cloud", "secagg": {"num_shares": 2}}, 422,
             "body.secagg: Value error, num_shares as an integer must be at least 3"),
            ({"model_name": "t-cloud", "secagg": {"clipping_range": 0}}, 422, "body.secagg.clipping_range"),
            ({"model_name": "t-cloud", "secagg": {"modulus_range": 1000}}, 422, "modulus_range must be a power of 2"),
            ({"model_name": "t-cloud", "secagg": {}, "min_fit": 2, "min_available": 2, "reference_data": ref,
              "differential_privacy": {"noise_multiplier": 0.1}}, 400, "cannot be combined with differential_privacy"),
        ]
        for body, code, words in cases:
            r = http.post("/api/v1/federation/rounds", json=body)
            assert r.status_code == code and words in r.json()["detail"], (body, r.text)
        r = http.post("/api/v1/federation/schedules", json={"cron": "61 * * * *", "round": {"model_name": "t-cloud"}})
        assert r.status_code == 400 and "cron expression '61 * * * *' is not valid" in r.json()["detail"]
        r = http.put("/api/v1/federation/sources/t-edge/1", content=hub_models.checkpoint_path.read_bytes())
        assert r.status_code == 400 and "it is a cloud checkpoint" in r.json()["detail"]
        assert http.get("/api/v1/federation/rounds").json()["count"] == before
        assert http.get("/api/v1/federation/rounds/999").status_code == 404
        assert http.get("/api/v1/federation/rounds", params={"status": "done"}).status_code == 400
    with _http(hub, "") as anonymous:
        assert anonymous.post("/api/v1/federation/rounds", json={"model_name": "t-cloud"}).status_code == 401


def test_schedules_from_the_cli(fed_hub: FedHub) -> None:
    hub = fed_hub.hub
    auth = ["--hub", hub.base_url, "--admin-token", hub.admin_token]
    create = ["fed", "schedule", "create", "--cron", "0 3 * * *", "--model", "t-cloud", "--rounds", "2", "--disabled"]
    refused = _edgefed(*create, *auth)
    assert refused.returncode == 1 and "which has no reference set" in refused.stderr  # the template is checked
    made = _edgefed(*create, "--reference-data", str(fed_hub.reference), *auth)
    assert made.returncode == 0, made.stderr
    assert "t-cloud at '0 3 * * *' (UTC), next never (disabled)" in made.stdout
    sid = int(made.stdout.split()[1].rstrip(":"))
    unknown = _edgefed("fed", "run", "--model", "nope", "--strategy-param", "proximal_mu=0.1", *auth)
    assert unknown.returncode == 1 and "HTTP 404: no model named 'nope'" in unknown.stderr
    bad_param = _edgefed("fed", "run", "--model", "t-cloud", "--strategy-param", "mu", *auth)
    assert bad_param.returncode == 2 and "--strategy-param 'mu': expected KEY=VALUE" in bad_param.stderr
    listed = _edgefed("fed", "schedule", "list", *auth)
    assert listed.returncode == 0 and "0 3 * * *" in listed.stdout and "t-cloud" in listed.stdout
    enabled = _edgefed("fed", "schedule", "enable", str(sid), *auth)
    assert enabled.returncode == 0 and f"schedule {sid} enabled; next " in enabled.stdout
    assert "T03:00:00" in enabled.stdout
    deleted = _edgefed("fed", "schedule", "delete", str(sid), *auth)
    assert deleted.returncode == 0
    with _http(hub) as http:
        assert http.get(f"/api/v1/federation/schedules/{sid}").status_code == 404
