"""Registering, listing and serving model versions.

A version is registered only after it is verified: bundles by ``shared.bundle.open_bundle`` against
the hub's trusted keys (schema, model hash, Ed25519 signature), checkpoints by loading them and
running one forward pass. A refused push leaves neither a database row nor a file behind.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_hub.db.models import ModelRow, ModelVersionRow
from cloud_hub.db.session import Database
from cloud_hub.errors import Conflict, InvalidInput, NotFound
from cloud_hub.inference.model import load_model
from cloud_hub.registry.keys import TrustedKeys
from cloud_hub.registry.store import BUNDLE_FILE, CHECKPOINT_FILE, ArtifactStore
from shared.bundle import BundleError, open_bundle, unpack_bundle

__all__ = ["ModelSummary", "ModelVersionInfo", "RegistryService"]

MEDIA_TYPES = {"edge": "application/gzip", "cloud": "application/octet-stream"}


@dataclass(frozen=True)
class ModelSummary:
    name: str
    kind: str
    task: str
    latest_version: str | None
    version_count: int


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered version; field names match ``shared.api_schemas.ModelVersionPublic``."""

    name: str
    version: str
    kind: str
    task: str
    parent_version: str | None
    sha256: str  # model.onnx's for edge bundles (as signed), the checkpoint file's for cloud models
    size_bytes: int
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    lineage: dict[str, Any] | None
    created_at: datetime
    artifact_relpath: str
    artifact_sha256: str  # of the downloadable file (bundle archive or checkpoint)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.kind]

    @classmethod
    def from_row(cls, row: ModelVersionRow) -> ModelVersionInfo:
        return cls(
            name=row.model.name,
            version=row.version,
            kind=row.model.kind,
            task=row.model.task,
            parent_version=row.parent_version,
            sha256=row.sha256,
            artifact_sha256=row.artifact_sha256,
            size_bytes=row.size_bytes,
            metrics=dict(row.metrics or {}),
            manifest=dict(row.manifest or {}),
            lineage=dict(row.lineage) if row.lineage is not None else None,
            created_at=row.created_at,
            artifact_relpath=row.artifact_path,
        )


class RegistryService:
    """Model versions in the database, their files in the artifact store.

    Lineage: every version has a ``parent_version`` (from its manifest or checkpoint meta) and an
    optional ``lineage`` dict recording how it was made. Callers that make versions (federation
    rounds, the factory) pass it to ``register_checkpoint``/``register_bundle``; by convention it holds
    ``federation_run_id``, ``round``, ``strategy``, ``regions`` (list of region names), and, when the
    parent is a version of *another* model, ``parent_model``. Any other JSON-serialisable keys are kept
    as given. ``lineage_chain`` walks from a version back to its root.
    """

    def __init__(self, db: Database, store: ArtifactStore, keys: TrustedKeys) -> None:
        self._db = db
        self._store = store
        self._keys = keys
        # One registration at a time: the exists-check, the file write and the insert stay consistent.
        self._write_lock = threading.Lock()

    # --- registering -----------------------------------------------------------------------
    def register_bundle(self, archive: bytes, lineage: dict[str, Any] | None = None) -> ModelVersionInfo:
        """Verify a bundle archive and register it as an edge model version.

        The manifest's ``provenance.federation_round`` and ``source_checkpoint_sha256`` are recorded in
        the lineage; ``lineage`` (see the class docstring) adds to them and wins on equal keys."""
        trusted = self._keys.load()
        if not trusted:
            raise InvalidInput(
                f"bundle refused: this hub trusts no signing keys, so it cannot verify any bundle; "
                f"add keys with {self._keys.describe()}",
                kind="bad_bundle",
            )
        self._store.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".incoming-", dir=self._store.root) as tmp:
            try:
                bundle = open_bundle(unpack_bundle(archive, Path(tmp) / "bundle"), trusted)
            except BundleError as exc:
                raise InvalidInput(f"bundle refused: {exc}", kind="bad_bundle") from None
            except (EOFError, zlib.error, tarfile.TarError) as exc:
                # unpack_bundle lets these through for truncated or corrupt gzip streams.
                raise InvalidInput(
                    f"bundle refused: archive is not a readable tar.gz: {exc}", kind="bad_bundle"
                ) from None
        m = bundle.manifest
        from_manifest: dict[str, Any] = {}
        if m.provenance.federation_round:
            from_manifest["federation_round"] = m.provenance.federation_round
        if m.provenance.source_checkpoint_sha256:
            from_manifest["source_checkpoint_sha256"] = m.provenance.source_checkpoint_sha256
        return self._register(
            name=m.name,
            version=m.version,
            kind="edge",
            task=m.task,
            parent_version=m.parent_version,
            filename=BUNDLE_FILE,
            data=archive,
            manifest=m.model_dump(mode="json", by_alias=True),
            metrics=m.metrics.model_dump(mode="json", exclude_none=True),
            model_sha256=m.model_sha256,
            lineage=_merge_lineage(from_manifest, lineage),
        )

    def register_checkpoint(self, data: bytes, lineage: dict[str, Any] | None = None) -> ModelVersionInfo:
        """Validate a cloud checkpoint (load + one forward pass on CPU) and register it.

        ``lineage`` records how it was made, e.g. for a federated round::

            registry.register_checkpoint(data, lineage={
                "federation_run_id": "run-7", "round": 3, "strategy": "fedavg", "regions": ["north", "south"],
            })

        The parent is the checkpoint meta's ``parent_version`` (of the same model unless the lineage
        names ``parent_model``). A lineage that is not a JSON object is refused with InvalidInput."""
        lineage = _merge_lineage({}, lineage)
        if not data:
            raise InvalidInput("checkpoint refused: the request body is empty", kind="bad_checkpoint")
        loaded = load_model(data, "cpu", cpu_runtime="torch")  # only probed here
        spec, meta = loaded.spec, loaded.meta
        return self._register(
            name=spec.name,
            version=spec.version,
            kind="cloud",
            task=spec.task,
            parent_version=meta.parent_version,
            filename=CHECKPOINT_FILE,
            data=data,
            manifest=meta.model_dump(mode="json"),
            metrics=dict(meta.metrics),
            lineage=lineage,
        )

    def _register(
        self,
        *,
        name: str,
        version: str,
        kind: str,
        task: str,
        parent_version: str | None,
        filename: str,
        data: bytes,
        manifest: dict[str, Any],
        metrics: dict[str, Any],
        model_sha256: str | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> ModelVersionInfo:
        with self._write_lock:
            with self._db.session() as s:
                model = s.scalars(select(ModelRow).where(ModelRow.name == name)).one_or_none()
                if model is not None:
                    _check_compatible(model, name, version, kind, task)
                    if s.scalars(
                        select(ModelVersionRow).where(
                            ModelVersionRow.model_id == model.id, ModelVersionRow.version == version
                        )
                    ).first():
                        raise Conflict(
                            f"model {name} version {version} is already registered; "
                            "versions are immutable, push a new version instead"
                        )
            stored = self._store.put(name, version, filename, data, manifest)
            try:
                with self._db.session() as s:
                    model = s.scalars(select(ModelRow).where(ModelRow.name == name)).one_or_none()
                    if model is None:
                        model = ModelRow(name=name, kind=kind, task=task)
                        s.add(model)
                        s.flush()
                    row = ModelVersionRow(
                        model=model,
                        version=version,
                        parent_version=parent_version,
                        sha256=model_sha256 or stored.sha256,
                        artifact_sha256=stored.sha256,
                        size_bytes=stored.size_bytes,
                        artifact_path=stored.relpath,
                        manifest=manifest,
                        metrics=metrics,
                        lineage=lineage,
                    )
                    s.add(row)
                    s.flush()
                    return ModelVersionInfo.from_row(row)
            except IntegrityError:
                self._store.remove(name, version)
                raise Conflict(
                    f"model {name} version {version} was registered concurrently; push a new version instead"
                ) from None
            except BaseException:
                self._store.remove(name, version)
                raise

    # --- reading ---------------------------------------------------------------------------
    def list_models(
        self, limit: int = 100, offset: int = 0, *, kind: str | None = None, task: str | None = None
    ) -> tuple[list[ModelSummary], int]:
        """Models by name, optionally only one kind (edge, cloud) or task."""
        conds = []
        if kind is not None:
            conds.append(ModelRow.kind == kind)
        if task is not None:
            conds.append(ModelRow.task == task)
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(ModelRow).where(*conds)) or 0
            models = s.scalars(
                select(ModelRow).where(*conds).order_by(ModelRow.name).limit(limit).offset(offset)
            ).all()
            out = []
            for m in models:
                count = s.scalar(select(func.count()).where(ModelVersionRow.model_id == m.id)) or 0
                latest = s.scalar(
                    select(ModelVersionRow.version)
                    .where(ModelVersionRow.model_id == m.id)
                    .order_by(ModelVersionRow.id.desc())
                    .limit(1)
                )
                out.append(ModelSummary(m.name, m.kind, m.task, latest, count))
            return out, total

    def list_versions(
        self, name: str, limit: int = 100, offset: int = 0, *, parent_version: str | None = None
    ) -> tuple[list[ModelVersionInfo], int]:
        """Versions of ``name``, newest first; ``parent_version`` keeps only that version's children."""
        with self._db.session() as s:
            model = self._model(s, name)
            conds = [ModelVersionRow.model_id == model.id]
            if parent_version is not None:
                conds.append(ModelVersionRow.parent_version == parent_version)
            total = s.scalar(select(func.count()).select_from(ModelVersionRow).where(*conds)) or 0
            rows = s.scalars(
                select(ModelVersionRow)
                .where(*conds)
                .order_by(ModelVersionRow.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            return [ModelVersionInfo.from_row(r) for r in rows], total

    def get_version(self, name: str, version: str) -> ModelVersionInfo:
        with self._db.session() as s:
            model = self._model(s, name)
            row = s.scalars(
                select(ModelVersionRow).where(
                    ModelVersionRow.model_id == model.id, ModelVersionRow.version == version
                )
            ).one_or_none()
            if row is None:
                raise NotFound(f"model {name} has no version {version!r}")
            return ModelVersionInfo.from_row(row)

    def lineage_chain(
        self, name: str, version: str, max_depth: int = 1000
    ) -> tuple[list[ModelVersionInfo], str | None]:
        """``name:version`` and its ancestors, newest first, following ``parent_version`` (into
        ``lineage["parent_model"]`` when set). The second value names the first parent that is not
        registered (None when the chain ends at a root)."""
        chain = [self.get_version(name, version)]
        seen = {(name, version)}
        while len(chain) < max_depth:
            current = chain[-1]
            if not current.parent_version:
                return chain, None
            parent_model = str((current.lineage or {}).get("parent_model") or current.name)
            key = (parent_model, current.parent_version)
            if key in seen:  # a cycle can only come from hand-made manifests; stop instead of looping
                return chain, None
            seen.add(key)
            try:
                chain.append(self.get_version(*key))
            except NotFound:
                return chain, f"{key[0]}:{key[1]}"
        return chain, None

    def latest_version(self, name: str) -> ModelVersionInfo:
        """The most recently registered version of ``name``; NotFound if it has none."""
        versions, _ = self.list_versions(name, limit=1)
        if not versions:
            raise NotFound(f"model {name} has no versions yet")
        return versions[0]

    def latest_cloud_versions(self) -> list[ModelVersionInfo]:
        """For each task, the newest cloud version: what inference serves after a restart."""
        with self._db.session() as s:
            rows = s.scalars(
                select(ModelVersionRow)
                .join(ModelRow)
                .where(ModelRow.kind == "cloud")
                .order_by(ModelVersionRow.id)
            ).all()
            latest: dict[str, ModelVersionInfo] = {}
            for row in rows:
                latest[row.model.task] = ModelVersionInfo.from_row(row)
            return list(latest.values())

    def artifact_file(self, info: ModelVersionInfo) -> Path:
        path = self._store.path(info.artifact_relpath)
        if not path.is_file():
            raise NotFound(f"artifact of {info.name}:{info.version} is missing from the store at {path}")
        return path

    @staticmethod
    def _model(s: Session, name: str) -> ModelRow:
        model = s.scalars(select(ModelRow).where(ModelRow.name == name)).one_or_none()
        if model is None:
            raise NotFound(f"no model named {name!r} is registered")
        return model


def _merge_lineage(base: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any] | None:
    """``base`` updated with ``given``; None when both are empty. Refuses what JSON cannot store."""
    if given is not None and not isinstance(given, dict):
        raise InvalidInput(f"lineage must be a JSON object, not {type(given).__name__}")
    merged = {**base, **(given or {})}
    try:
        json.dumps(merged, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"lineage is not JSON-serialisable: {exc}") from None
    if any(not isinstance(k, str) for k in merged):
        raise InvalidInput("lineage keys must be strings")
    return merged or None


def _check_compatible(model: ModelRow, name: str, version: str, kind: str, task: str) -> None:
    if model.kind != kind:
        raise Conflict(
            f"model {name} is registered as a {model.kind} model; version {version} is a {kind} "
            "model: use another name"
        )
    if model.task != task:
        raise Conflict(f"model {name} serves task {model.task!r}; version {version} declares task {task!r}")
