"""The model registry: artifacts on disk under the hub's data directory, metadata in the database."""

from cloud_hub.registry.keys import TrustedKeys
from cloud_hub.registry.service import ModelVersionInfo, RegistryService
from cloud_hub.registry.store import ArtifactStore

__all__ = ["ArtifactStore", "ModelVersionInfo", "RegistryService", "TrustedKeys"]
