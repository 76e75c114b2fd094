"""The PyTorch source checkpoint of an edge version: what a federation run of an edge model starts from.

An edge version is a signed INT8 ONNX bundle, which cannot be trained further; its source checkpoint
(the ``shared.models`` checkpoint it was compressed from) lives beside the bundle as ``source.pt``.
Federation hand-overs write it for the versions they create; for a pushed bundle an admin uploads it
once (``PUT /api/v1/federation/sources/{name}/{version}`` or ``edgefed fed run --source-checkpoint``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cloud_hub.errors import InvalidInput
from cloud_hub.registry import ModelVersionInfo, RegistryService

__all__ = ["SOURCE_FILE", "source_path", "initial_checkpoint", "store_source"]

SOURCE_FILE = "source.pt"


def source_path(registry: RegistryService, info: ModelVersionInfo) -> Path:
    """Where ``info``'s source checkpoint lives (it may not exist)."""
    return registry.artifact_file(info).parent / SOURCE_FILE


def initial_checkpoint(registry: RegistryService, info: ModelVersionInfo) -> Path:
    """The checkpoint a run of ``info`` starts from; InvalidInput naming the fix if there is none."""
    if info.kind == "cloud":
        return registry.artifact_file(info)
    path = source_path(registry, info)
    if not path.is_file():
        raise InvalidInput(
            f"edge model {info.name} version {info.version} has no source checkpoint, so federation cannot "
            f"train it: upload the checkpoint it was compressed from with PUT /api/v1/federation/sources/"
            f"{info.name}/{info.version} (or `edgefed fed run --source-checkpoint PATH`)",
            kind="no_source_checkpoint",
        )
    return path


def store_source(registry: RegistryService, info: ModelVersionInfo, data: bytes) -> Path:
    """Check that ``data`` is the checkpoint ``info`` was made from, and store it beside the bundle."""
    from shared.models import CheckpointError, load_checkpoint

    if info.kind != "edge":
        raise InvalidInput(
            f"model {info.name} is a cloud model: its registered checkpoint already is its source",
            kind="bad_checkpoint",
        )
    try:
        ckpt = load_checkpoint(data)
    except CheckpointError as exc:
        raise InvalidInput(f"source checkpoint refused: {exc}", kind="bad_checkpoint") from None
    meta, manifest = ckpt.meta, info.manifest
    problems = []
    if meta.role != "edge":
        problems.append(f"it is a {meta.role} checkpoint; an edge version is compressed from an edge checkpoint")
    arch = (manifest.get("provenance") or {}).get("architecture")
    if arch and arch != meta.arch:
        problems.append(f"its architecture {meta.arch!r} is not the bundle's {arch!r}")
    signed = (manifest.get("provenance") or {}).get("source_checkpoint_sha256")
    if signed and signed != hashlib.sha256(data).hexdigest():
        problems.append(f"its SHA-256 is not the one the bundle's manifest names ({signed[:12]}…)")
    if meta.task != info.task:
        problems.append(f"it is for task {meta.task!r}, the model for {info.task!r}")
    if list(meta.labels) != list(manifest.get("labels", meta.labels)):
        problems.append(f"its labels {meta.labels} differ from the bundle's {manifest.get('labels')}")
    shape = (manifest.get("input") or {}).get("shape")
    if shape and list(meta.input.shape) != list(shape):
        problems.append(f"its input shape {meta.input.shape} differs from the bundle's {shape}")
    if problems:
        raise InvalidInput(
            f"source checkpoint refused for {info.name}:{info.version}: " + "; ".join(problems),
            kind="bad_checkpoint",
        )
    path = source_path(registry, info)
    fd, tmp = tempfile.mkstemp(prefix=".source-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
