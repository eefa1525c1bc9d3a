"""Pointing MLflow's process-wide (fluent) client at one store for a block of code.

The registry logs and downloads models through ``mlflow.pyfunc`` / ``mlflow.artifacts``, which
only use the global tracking and registry URIs; the ``Tracker`` of a training run never does.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def use_tracking_uri(uri: str):
    """Temporarily point the global MLflow client at ``uri`` (registry too)."""
    # imported on use: pipeline/tracking/__init__ imports this module, and rank 0's train worker
    # imports that package for its attention plots, where mlflow would cost 2.0 s of CPU in the
    # middle of training (measured: see transport.py); the registry, the only caller, has it
    # loaded already
    import mlflow  # noqa: PLC0415

    prev_t, prev_r = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev_t)
        mlflow.set_registry_uri(prev_r)
