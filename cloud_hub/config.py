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
    max_queue: int = Field(10_000, ge=1)
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    activity_flush_s: float = Field(1.0, gt=0)
    worker_id: str = Field(default_factory=lambda: f"hub-{socket.gethostname()}-{os.getpid()}")
    log_level: str = "INFO"

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
