"""Pointing MLflow's process-wide (fluent) client at one store for a block of code.

The registry logs and downloads models through ``mlflow.pyfunc`` / ``mlflow.artifacts``, which
only use the global tracking and registry URIs; the ``Tracker`` of a training run never does.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def use_tracking_uri(uri: str):
    """Temporarily point the global MLflow client at ``uri`` (registry too)."""
    import mlflow

    prev_t, prev_r = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev_t)
        mlflow.set_registry_uri(prev_r)
