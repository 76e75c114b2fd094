"""The agent's one settings object, built at the CLI entry point and passed down.

Nothing in ``edge_agent`` reads the environment: typer maps ``EDGEFED_*`` variables onto options,
the options become an ``AgentSettings``, and every component receives the fields it needs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_agent.policy import POLICIES, PolicyConfig, validate_threshold
from edge_agent.redaction import RedactionRule, parse_rules
from edge_agent.scores import ScoreName
from shared.mqtt import parse_broker_url
from shared.topics import validate_device_id

__all__ = ["AgentSettings", "SettingsError", "build_settings"]

MiB = 1024 * 1024


class SettingsError(ValueError):
    """The agent's settings are invalid; the message names the first bad field. The agent does not start."""


class AgentSettings(BaseModel):
    """Everything one agent process needs to know."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hub_url: str = Field(description="Base URL of the cloud hub, e.g. http://127.0.0.1:8080")
    broker_url: str = Field(description="mqtt://HOST:PORT or mqtts://HOST:PORT")
    device_id: str
    region: str = Field(default="", max_length=128)
    token: str | None = Field(default=None, repr=False, description="Device token for the hub")
    data_dir: Path | None = Field(default=None, description="Defaults to .edgefed/agent-<device id>")
    threshold: float = 0.8
    policy: str = "threshold"
    escalation_timeout_s: float = Field(default=1.0, gt=0, le=60)
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    trusted_key: Path | None = None
    model_name: str | None = None
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    hub_timeout_s: float = Field(default=10.0, gt=0)
    # How long start() waits for the broker before serving edge-only (it keeps reconnecting).
    broker_connect_wait_s: float = Field(default=3.0, ge=0)
    # Unanswered escalations kept on disk for a later re-send; the oldest are dropped beyond this.
    outbox_max_items: int = Field(default=10_000, ge=1)
    # Bodies above this are refused before decoding: an edge box must not buffer arbitrary uploads.
    max_body_bytes: int = Field(default=8 * MiB, ge=1024)
    # Budget policy: escalate this share of cases, ranked by this score, over this many recent cases.
    budget_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    budget_score: ScoreName = "confidence"
    budget_window: int = Field(default=1000, ge=10)
    # Circuit breaker: open after this many consecutive timed-out or too-slow escalations.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    breaker_latency_ms: float | None = Field(default=None, gt=0)
    # Redaction of request metadata, e.g. "operator:hash,serial:mask,badge:drop".
    redact: list[RedactionRule] = Field(default_factory=list)
    redact_unlisted: bool = False  # True: drop metadata fields that have no rule
    redact_salt: str | None = Field(default=None, repr=False)
    # Local learning store bounds.
    learning_max_items: int = Field(default=50_000, ge=1)
    learning_retention_days: float | None = Field(default=30.0, gt=0)
    # Recent answered inputs kept in memory so an inspector's feedback can be stored with its input.
    feedback_cache_mib: float = Field(default=4.0, gt=0, le=1024)
    telemetry_interval_s: float = Field(default=30.0, gt=0)
    outbox_max_backoff_s: float = Field(default=30.0, gt=0)

    @field_validator("redact", mode="before")
    @classmethod
    def _redact(cls, v: object) -> object:
        if v is None or isinstance(v, str):
            return parse_rules(v)
        if isinstance(v, list) and all(isinstance(i, str) for i in v):
            return parse_rules(v)
        return v

    @field_validator("hub_url")
    @classmethod
    def _hub_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"hub URL {v!r} is invalid: write http://HOST:PORT or https://HOST:PORT")
        return v.rstrip("/")

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        parse_broker_url(v)
        return v

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        return validate_device_id(v)

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        return validate_threshold(v)

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in POLICIES:
            raise ValueError(f"unknown escalation policy {v!r}; choose one of: {', '.join(POLICIES)}")
        return v

    @model_validator(mode="after")
    def _default_data_dir(self) -> AgentSettings:
        if self.data_dir is None:
            object.__setattr__(self, "data_dir", Path(".edgefed") / f"agent-{self.device_id}")
        return self

    @property
    def root(self) -> Path:
        """The data directory (always set after validation)."""
        assert self.data_dir is not None
        return self.data_dir

    @property
    def bundles_dir(self) -> Path:
        return self.root / "bundles"

    @property
    def pinned_keys_path(self) -> Path:
        return self.root / "trusted_keys.pem"

    @property
    def outbox_path(self) -> Path:
        return self.root / "outbox.sqlite3"

    @property
    def learning_path(self) -> Path:
        return self.root / "learning.sqlite3"

    @property
    def rollback_path(self) -> Path:
        return self.root / "rollback.json"

    @property
    def salt_path(self) -> Path:
        return self.root / "redaction.salt"

    @property
    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(
            name=self.policy,
            threshold=self.threshold,
            budget_rate=self.budget_rate,
            budget_score=self.budget_score,
            budget_window=self.budget_window,
        )


def build_settings(**values: object) -> AgentSettings:
    """Validate ``values`` into AgentSettings, or raise SettingsError naming the first problem."""
    try:
        return AgentSettings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"{loc}: {msg}") from None
