"""MLflow tracking from the driver; a tracking server that is down never stops training.

``Tracker``: one training run's params, metrics and artifacts; ``plots``: the figures it logs;
``use_tracking_uri``: MLflow's global client pointed at a store for a block (the registry's
fluent calls). Imports only the shared base modules.
"""

from pipeline.tracking.global_uri import use_tracking_uri
from pipeline.tracking.mlflow_tracker import Tracker, resolve_tracking_uri
from pipeline.tracking.transport import PermanentError, TrackingError, TransientError

__all__ = [
    "PermanentError",
    "Tracker",
    "TrackingError",
    "TransientError",
    "resolve_tracking_uri",
    "use_tracking_uri",
]
