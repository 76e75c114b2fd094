"""Submitting federation runs to a SuperLink and following them, through Flower's own CLI.

``FederationClient`` keeps its SuperLink connection in its own ``FLWR_HOME/config.toml`` (never in
a pyproject: ``[tool.flwr.federations]`` is legacy in Flower 1.41) and drives ``flwr run`` /
``flwr ls`` / ``flwr stop`` with ``--format json``. The whole ``FedRunSpec`` travels as the run config
key ``spec`` (JSON, written to ``<output_dir>/run-config.toml``). The ServerApp writes
``global.pt`` and ``result.json`` into ``spec.output_dir``, which ``read_result`` reads back.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from federation.spec import FedResult, FedRunSpec, FedRunState, RunStatus

__all__ = ["DEFAULT_APP_DIR", "CONNECTION", "FederationError", "FederationClient", "read_result"]

DEFAULT_APP_DIR = Path(__file__).resolve().parent / "flower_app"
CONNECTION = "edgefed"

# Flower's run states (flwr ls) → ours.
_STATUS: dict[str, RunStatus] = {
    "pending": "queued",
    "starting": "queued",
    "running": "running",
    "finished:completed": "finished",
    "finished:failed": "failed",
    "finished:stopped": "failed",
}


class FederationError(RuntimeError):
    """The SuperLink refused a request or could not be reached; the message carries Flower's words."""


def read_result(output_dir: Path) -> FedResult:
    """The ``FedResult`` a run left in ``output_dir``.

    ``FileNotFoundError`` if there is none yet, ``ValueError`` if it is unreadable.
    """
    path = Path(output_dir) / "result.json"
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    known = set(FedResult.__dataclass_fields__)
    d = {k: v for k, v in d.items() if k in known}
    if d.get("global_checkpoint"):
        d["global_checkpoint"] = Path(d["global_checkpoint"])
    try:
        return FedResult(**d)
    except TypeError as exc:
        raise ValueError(f"{path} does not describe a federation result: {exc}") from None


class FederationClient:
    """Submit, follow and stop runs on one SuperLink (``control_address`` = its HOST:PORT)."""

    def __init__(
        self,
        control_address: str,
        flwr_home: Path,
        app_dir: Path = DEFAULT_APP_DIR,
        *,
        root_certificates: Path | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        if ":" not in control_address or "://" in control_address:
            raise ValueError(f"control address must be HOST:PORT without a scheme, got {control_address!r}")
        if not (Path(app_dir) / "pyproject.toml").is_file():
            raise FileNotFoundError(f"{app_dir} has no pyproject.toml; it is not a Flower App directory")
        self.control_address = control_address
        self.flwr_home = Path(flwr_home)
        self.app_dir = Path(app_dir)
        self.root_certificates = root_certificates
        self.timeout_s = timeout_s
        self._outputs: dict[str, Path] = {}  # run id → output dir, for runs submitted by this client
        self._write_config()

    def _write_config(self) -> None:
        import tomli_w

        conn: dict[str, Any] = {"address": self.control_address}
        if self.root_certificates is not None:
            conn["root-certificates"] = str(self.root_certificates)
        else:
            conn["insecure"] = True
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(doc))

    def _flwr(self, *args: str) -> dict[str, Any]:
        from federation.processes import flower_executable, flwr_env

        argv = [flower_executable("flwr"), *args, "--format", "json"]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, env=flwr_env(self.flwr_home),
                               timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise FederationError(f"`flwr {args[0]}` got no answer from {self.control_address} "
                                  f"within {self.timeout_s:.0f} s") from None
        try:
            out = json.loads(r.stdout)
        except json.JSONDecodeError:
            msg = (r.stdout + r.stderr).strip()[-800:]
            raise FederationError(f"`flwr {args[0]}` failed (exit {r.returncode}): {msg}") from None
        if not out.get("success", False):
            raise FederationError(f"`flwr {args[0]}` failed: {out.get('error-message') or out}")
        return out

    def submit(self, spec: FedRunSpec) -> str:
        """Start a run for ``spec`` on the SuperLink; return Flower's run id.

        Checks the spec first (strategy, parameters, privacy settings, checkpoint present), so a bad
        spec fails here with a clear message and nothing reaches the SuperLink.
        """
        import tomli_w

        from federation.strategies import build_strategy

        build_strategy(spec, spec.fraction_evaluate)  # every check Flower's constructors make, too
        if spec.kind not in ("edge", "cloud"):
            raise ValueError(f"kind must be 'edge' or 'cloud', got {spec.kind!r}")
        if not Path(spec.initial_checkpoint).is_file():
            raise FileNotFoundError(f"initial checkpoint {spec.initial_checkpoint} does not exist")
        if not 0.0 <= spec.soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be between 0 and 1, got {spec.soft_weight}")
        out_dir = Path(spec.output_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        d = spec.to_dict()
        d["initial_checkpoint"] = str(Path(spec.initial_checkpoint).resolve())
        d["output_dir"] = str(out_dir)
        if spec.reference_data is not None:
            d["reference_data"] = str(Path(spec.reference_data).resolve())
        run_config = out_dir / "run-config.toml"
        run_config.write_text(tomli_w.dumps({"spec": json.dumps(d)}))
        out = self._flwr("run", str(self.app_dir), CONNECTION, "--run-config", str(run_config))
        run_id = str(out["run-id"])
        self._outputs[run_id] = out_dir
        return run_id

    def list_runs(self) -> list[dict[str, Any]]:
        return list(self._flwr("ls", CONNECTION).get("runs", []))

    def status(self, run_id: str) -> FedRunState:
        """Where run ``run_id`` stands (queued, running, finished, failed with Flower's reason)."""
        out = self._flwr("ls", CONNECTION, "--run-id", str(int(run_id)))
        runs = out.get("runs", [])
        if not runs:
            raise FederationError(f"run {run_id} is not known to the SuperLink at {self.control_address}")
        raw = str(runs[0].get("status", ""))
        status = _STATUS.get(raw)
        if status is None:
            status = "failed" if raw.startswith("finished") else "running"
        reason = ""
        if status == "failed":
            reason = str(runs[0].get("status-details") or raw)
            if raw == "finished:stopped":
                reason = f"stopped: {reason}" if reason and reason != raw else "stopped by request"
        return FedRunState(run_id=str(run_id), status=status, reason=reason)

    def stop(self, run_id: str) -> None:
        """Ask the SuperLink to stop run ``run_id``."""
        self._flwr("stop", str(int(run_id)), CONNECTION)

    def wait(self, run_id: str, timeout: float, poll_s: float = 2.0) -> FedRunState:
        """Wait until the run finished or failed (per the SuperLink), or raise ``TimeoutError``.

        For runs this client submitted, the (local, cheap) ``result.json`` is watched and the
        SuperLink asked once the ServerApp wrote its final status; other runs poll ``status``
        every ``poll_s`` seconds (each ``flwr ls`` costs a process start).
        """
        import time

        deadline = time.monotonic() + timeout
        out_dir = self._outputs.get(str(run_id))
        state = FedRunState(run_id=str(run_id), status="queued")
        while True:
            done_locally = False
            if out_dir is not None:
                try:
                    done_locally = read_result(out_dir).status in ("finished", "failed")
                except (FileNotFoundError, ValueError):
                    done_locally = False
            if out_dir is None or done_locally or int(time.monotonic()) % 10 == 0:
                state = self.status(run_id)
                if state.status in ("finished", "failed"):
                    return state
            if time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} still {state.status} after {timeout:.0f} s")
            time.sleep(poll_s if out_dir is None else 0.3)

    read_result = staticmethod(read_result)
