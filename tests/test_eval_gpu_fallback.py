"""A checkpoint trained on GPUs is evaluated on CPU actors, with a warning, where the cluster has
no GPU and cannot get one (it used to ask for GPU actors and wait forever)."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import DinoConfig
from pipeline.evaluate.knn_eval import eval_on_gpu


@pytest.mark.ray
def test_gpu_run_is_evaluated_on_cpu_when_no_gpu_can_be_had(ray_session, caplog):
    cfg = DinoConfig().with_overrides({"train.use_gpu": True})
    with caplog.at_level(logging.WARNING, logger="dino_ray.evaluate"):
        assert eval_on_gpu(cfg) is False
    assert "runs on CPU" in caplog.text
    assert eval_on_gpu(DinoConfig()) is False  # a CPU run never asks
