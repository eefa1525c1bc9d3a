"""MLflow tracking from the driver; a tracking server that is down never stops training."""

from pipeline.tracking.mlflow_tracker import Tracker, configure_http, resolve_tracking_uri

__all__ = ["Tracker", "configure_http", "resolve_tracking_uri"]
