"""Federation at the hub: runs submitted to Flower's SuperLink (``service``), cron schedules
(``scheduler``), and the hand-over of a finished run's model to the registry (``handover``)."""

from cloud_hub.federation.scheduler import FederationScheduler, check_cron, next_fire
from cloud_hub.federation.service import FederationConfig, FederationService, RolloutHook

__all__ = [
    "FederationConfig",
    "FederationScheduler",
    "FederationService",
    "RolloutHook",
    "check_cron",
    "next_fire",
]
