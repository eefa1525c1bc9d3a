"""Shared fixtures: one local Ray session for the whole test run, tiny real image corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Test-run settings of Ray Train (inherited by the embedded Ray and by the test clusters' nodes):
# its controller polls the workers every 0.5 s instead of 2 s (the end of every run, and an
# epoch report while the previous one is unread, wait for that poll), and no preemption-watcher
# actor (it reports cloud node drains, which no test has; one process less per run to start).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than cores (see pipeline.ray_runtime), shared by tests."""
    import ray

    from pipeline.ray_runtime import ensure_ray

    ensure_ray(num_cpus=6)  # what the jobs do on an embedded cluster, at a fixed size
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The scikit-learn digits as PNG class folders (real images, no download)."""
    from pipeline.data.demo_corpus import build_digits_corpus

    return build_digits_corpus(tmp_path_factory.mktemp("digits"), size=32)


@pytest.fixture
def mlflow_sqlite():
    """``mlflow_sqlite(path)``: a new MLflow SQLite store at ``path`` and its URI, its schema
    copied instead of migrated (``live_services.mlflow_sqlite``)."""
    from live_services import mlflow_sqlite

    return mlflow_sqlite
