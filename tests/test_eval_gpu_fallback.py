"""A checkpoint trained on GPUs is evaluated on CPU actors, with a warning, where the cluster has
no GPU and cannot get one (it used to ask for GPU actors and wait forever); on GPU actors, without
a warning, where the cluster has one or its autoscaler can add one."""

from __future__ import annotations

import logging

import pytest

from pipeline.cluster import ClusterView, NodeType
from pipeline.config import DinoConfig
from pipeline.evaluate.knn_eval import eval_on_gpu

GPU_RUN = DinoConfig().with_overrides({"train.use_gpu": True})
FALLBACK = "runs on CPU"  # the warning's words


def _cluster_gpus(ray) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


@pytest.mark.ray
def test_gpu_run_is_evaluated_on_cpu_when_no_gpu_can_be_had(ray_session, caplog):
    if _cluster_gpus(ray_session) >= 1:  # the embedded Ray holds this host's GPUs
        pytest.skip("this host has a GPU: the fallback cannot happen on its embedded Ray")
    with caplog.at_level(logging.WARNING, logger="dino_ray.evaluate"):
        assert eval_on_gpu(GPU_RUN) is False
    assert FALLBACK in caplog.text
    assert eval_on_gpu(DinoConfig()) is False  # a CPU run never asks


@pytest.mark.ray
def test_gpu_run_is_evaluated_on_the_gpu_of_a_gpu_host(ray_session, caplog):
    if _cluster_gpus(ray_session) < 1:
        pytest.skip("needs a GPU in the Ray cluster (a CUDA host)")
    with caplog.at_level(logging.WARNING, logger="dino_ray.evaluate"):
        assert eval_on_gpu(GPU_RUN) is True
    assert FALLBACK not in caplog.text
    assert eval_on_gpu(DinoConfig()) is False  # a CPU run never asks, GPU or not


def test_gpu_run_is_evaluated_on_gpu_when_the_autoscaler_can_add_one(monkeypatch, caplog):
    """A CPU-only head whose autoscaler has a GPU node type: GPU actors (the autoscaler brings
    the node), no fallback; the same head with CPU node types only falls back."""
    head = {"CPU": 4.0, "node:__internal_head__": 1.0}
    gpu_type = NodeType("gpu-worker", {"CPU": 8.0, "GPU": 1.0}, max_workers=2)
    cpu_type = NodeType("cpu-worker", {"CPU": 8.0}, max_workers=2)
    views = {
        "gpu": ClusterView.from_nodes([head], [cpu_type, gpu_type], head_node_type="head"),
        "cpu": ClusterView.from_nodes([head], [cpu_type], head_node_type="head"),
    }
    for kind, expected in (("gpu", True), ("cpu", False)):
        monkeypatch.setattr(ClusterView, "current", classmethod(lambda cls, v=views[kind]: v))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dino_ray.evaluate"):
            assert eval_on_gpu(GPU_RUN) is expected, kind
        assert (FALLBACK in caplog.text) is not expected, kind
