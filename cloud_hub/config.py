"""The hub's settings: one object, built at the entry point (CLI or test) and passed down.

Every field can come from an ``EDGEFED_*`` environment variable. Fields whose bare name would be
ambiguous next to the agent's settings (host, port, data dir, device) read ``EDGEFED_HUB_*``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["HubSettings"]


def _env(field: str, env: str) -> AliasChoices:
    # The field name stays usable as a keyword; the env name is what users set.
    return AliasChoices(field, env)


class HubSettings(BaseSettings):
    """Everything ``edgefed hub serve`` needs to know."""

    model_config = SettingsConfigDict(env_prefix="EDGEFED_", extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", validation_alias=_env("host", "EDGEFED_HUB_HOST"))
    port: int = Field(8080, ge=0, le=65535, validation_alias=_env("port", "EDGEFED_HUB_PORT"))
    data_dir: Path = Field(Path(".edgefed/hub"), validation_alias=_env("data_dir", "EDGEFED_HUB_DATA_DIR"))
    db_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/hub.db")
    broker_url: str = "mqtt://127.0.0.1:1883"
    broker_username: str | None = None
    broker_password: str | None = None
    broker_ca_file: Path | None = None
    device: Literal["cpu", "cuda"] = Field("cpu", validation_alias=_env("device", "EDGEFED_HUB_DEVICE"))
    admin_token: str | None = Field(
        None, description="Admin bearer token; generated into <data_dir>/admin.token"
    )
    signing_public_keys: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("signing_public_keys", "EDGEFED_SIGNING_PUBLIC_KEY"),
        description="PEM Ed25519 public keys trusted for bundles, besides <data_dir>/keys/*.pub",
    )
    default_model_name: str = Field(
        "elpv-edge", validation_alias=_env("default_model_name", "EDGEFED_DEFAULT_MODEL")
    )
    max_batch_size: int = Field(32, ge=1, le=4096)
    cpu_runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="What runs a cloud model on the CPU (PyTorch when the export does not match)"
    )
    cpu_threads: int = Field(0, ge=0, le=256, description="Threads per CPU model; 0: half the usable cores")
    max_queue: int = Field(10_000, ge=1, description="Requests waiting for inference before submits are refused")
    max_queue_delay_ms: float = Field(
        2.0, ge=0, le=1000, description="Longest a request waits for others to share its batch"
    )
    request_deadline_ms: float = Field(
        5000.0, ge=0, description="A request not started within this is answered deadline_exceeded; 0: none"
    )
    warmup_batches: int = Field(
        2, ge=0, le=100, description="Warm-up batches per batch size class before a model goes live"
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    activity_flush_s: float = Field(1.0, gt=0)
    # Rollouts (cloud_hub.rollouts): controller tick, telemetry kept for the gates, and how far before
    # a window the controller looks for each device's last sample (the window's starting counters).
    rollout_tick_s: float = Field(2.0, gt=0, description="Seconds between rollout controller ticks")
    telemetry_retention_s: float = Field(24 * 3600.0, gt=0, description="Device health samples kept this long")
    health_lookback_s: float = Field(300.0, gt=0, description="Look-back for a window's starting sample")
    # Raw escalation payloads: stored only while enabled (off unless an admin turns it on), pruned by age
    # and count. The policy lives in the database, shared by all hubs on it, and changes at run time
    # through PUT /api/v1/escalations/payload-storage; values given here (not None) are written to it
    # when `hub serve` starts. Defaults when never set: off, 7 days, 10,000 payloads.
    store_payloads: bool | None = None
    payload_retention_s: float | None = Field(None, gt=0)
    payload_max_rows: int | None = Field(None, ge=1)
    # Per-minute escalation statistics older than this are deleted.
    stats_retention_s: float = Field(30 * 24 * 3600.0, gt=0)
    worker_id: str = Field(default_factory=lambda: f"hub-{socket.gethostname()}-{os.getpid()}")
    # Escalations are single images; bigger payloads get an 'oversized' error answer (below the broker's limit).
    max_escalation_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=16 * 1024 * 1024)
    # `hub worker` only: how long to wait for the API process to migrate the database, and how often
    # to look for newly pushed cloud models.
    db_wait_s: float = Field(120.0, ge=0)
    model_refresh_s: float = Field(5.0, gt=0)
    log_level: str = "INFO"
    # --- federation (cloud_hub.federation) ---------------------------------------------------
    superlink_address: str = Field(
        "127.0.0.1:9093",
        validation_alias=_env("superlink_address", "EDGEFED_SUPERLINK"),
        description="The SuperLink's Control API (HOST:PORT) the hub submits federation runs to",
    )
    flwr_home: Path | None = Field(None, description="FLWR_HOME of the hub's Flower client; default <data_dir>/flwr")
    fed_output_dir: Path | None = Field(None, description="Run outputs; default <data_dir>/federation")
    fed_poll_s: float = Field(2.0, gt=0, description="How often a running federation run is polled")
    fed_unreachable_grace_s: float = Field(
        120.0, ge=0, description="How long the SuperLink may be unreachable before a running run is failed"
    )
    fed_gate_min_improvement_pt: float = Field(
        0.0, ge=-100, le=100, description="A run's model must beat its parent by this many points to be registered"
    )
    fed_gate_metric: str = Field("val_accuracy", description="Reference-set metric (result.json) the gate compares")
    fed_max_drop_pt: float = Field(1.0, ge=0, description="INT8 accuracy gate when compressing a federated edge model")
    signing_key_file: Path | None = Field(
        None,
        validation_alias=_env("signing_key_file", "EDGEFED_SIGNING_KEY"),
        description="Ed25519 key that signs federated edge bundles; default <data_dir>/keys/hub-signing.pem",
    )

    @field_validator("signing_public_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # One option, repeatable or comma-separated, both from the CLI and from the environment.
        if isinstance(value, (str, Path)):
            value = [value]
        if isinstance(value, (list, tuple)):
            out: list[str] = []
            for item in value:
                out += [p.strip() for p in str(item).split(",") if p.strip()]
            return out
        return value

    # --- derived paths ---------------------------------------------------------------------
    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / 'hub.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def flwr_home_dir(self) -> Path:
        return self.flwr_home or self.data_dir / "flwr"

    @property
    def fed_output_root(self) -> Path:
        return self.fed_output_dir or self.data_dir / "federation"

    @property
    def signing_key_path(self) -> Path:
        # In keys_dir, so its public half (written beside it) is trusted for the bundles it signs.
        return self.signing_key_file or self.keys_dir / "hub-signing.pem"
