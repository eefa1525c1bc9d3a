"""MLflow tracking from the driver; a tracking server that is down never stops training."""

from pipeline.tracking.mlflow_tracker import Tracker, resolve_tracking_uri
from pipeline.tracking.transport import PermanentError, TrackingError, TransientError

__all__ = ["PermanentError", "Tracker", "TrackingError", "TransientError", "resolve_tracking_uri"]
