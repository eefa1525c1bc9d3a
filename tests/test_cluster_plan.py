"""Planning from what the cluster can become, the preflight checks and the retry decision, on
cluster views built from the repository's cluster.yaml and from plain numbers (no Ray)."""

from __future__ import annotations

import pytest

from pipeline.cluster import ClusterView, NodeType, node_types_from_cluster_yaml
from pipeline.commands.submit import repo_root
from pipeline.config import DinoConfig
from pipeline.data.resources import ResourceError, plan_data_resources
from pipeline.preflight import (
    PreflightError,
    check_cluster,
    check_config,
    check_corpus,
    train_worker_bundle,
)
from pipeline.train.failures import classify, root_cause

HEAD = {"CPU": 2.0, "head": 1.0, "node:__internal_head__": 1.0}


def _fresh_ray_up_cluster() -> ClusterView:
    """What `ray up cluster.yaml` gives before the autoscaler adds a node: the head alone."""
    types, head = node_types_from_cluster_yaml((repo_root() / "cluster.yaml").read_text())
    return ClusterView.from_nodes([HEAD], types, head_node_type=head)


def _cfg(**updates) -> DinoConfig:
    return DinoConfig().with_overrides(
        {"data.path": "s3://bucket/corpus", "train.storage_path": "s3://bucket/runs", **updates}
    )


def test_cluster_yaml_node_types_are_what_the_planner_grows_to():
    view = _fresh_ray_up_cluster()
    assert {t.name for t in view.addable_types} == {"cpu_data", "gpu_train", "gpu_train_spot"}
    assert view.autoscaling and view.multi_node and view.now_total("CPU") == 2
    # head 2 + 8 data nodes x 16 + 4 + 4 (spot) train nodes x 8 (global max_workers 16)
    assert view.max_total("CPU") == 2 + 8 * 16 + 8 * 8
    assert view.max_total("GPU") == 8 and view.has_role("data") and view.has_role("train")
    # planned from what is up now, every job was rejected before the autoscaler could act
    with pytest.raises(ResourceError):
        plan_data_resources(view.now_total("CPU"), 2, 8)
    plan = plan_data_resources(view.max_total("CPU"), 2, 8, num_actors=16)
    assert plan.num_actors == 16 and plan.data_cpus > 100


def test_a_cluster_without_autoscaler_is_what_is_alive():
    one = ClusterView.from_nodes([{"CPU": 8.0}])
    assert not one.multi_node and one.max_total("CPU") == 8 and not one.has_role("train")
    two = ClusterView.from_nodes([{"CPU": 8.0}, {"CPU": 4.0, "data": 4.0}])
    assert two.multi_node and two.max_total("CPU") == 12 and two.has_role("data")


def test_local_paths_are_refused_on_a_multi_node_cluster_with_the_field_named():
    view = _fresh_ray_up_cluster()
    check_cluster(_cfg(**{"train.use_gpu": True}), view)  # object storage everywhere: fine
    with pytest.raises(PreflightError, match=r"train\.storage_path='\./runs' is a local path"):
        check_cluster(_cfg(**{"train.storage_path": "./runs", "train.use_gpu": True}), view)
    with pytest.raises(PreflightError, match=r"data\.path='demo'"):
        check_cluster(_cfg(**{"data.path": "demo", "train.use_gpu": True}), view)
    with pytest.raises(PreflightError, match=r"eval\.val_path"):
        check_cluster(
            _cfg(
                **{
                    "eval.train_path": "s3://b/t",
                    "eval.val_path": "/data/val",
                    "train.use_gpu": True,
                }
            ),
            view,
        )
    # declared NFS: allowed; one machine: allowed
    check_cluster(
        _cfg(
            **{
                "train.storage_path": "/mnt/nfs/runs",
                "train.shared_filesystem": True,
                "train.use_gpu": True,
            }
        ),
        view,
    )
    check_cluster(
        _cfg(**{"train.storage_path": "./runs", "data.path": "demo"}),
        ClusterView.from_nodes([{"CPU": 4.0}]),
    )


def test_train_workers_no_node_can_hold_fail_before_ray_work():
    cpu_only = ClusterView.from_nodes(
        [HEAD],
        [
            NodeType("data", {"CPU": 16.0, "data": 16.0}, 4),
            NodeType("train", {"CPU": 8.0, "train": 1.0}, 2),
        ],
    )
    with pytest.raises(PreflightError, match=r"train\.use_gpu.*GPU"):
        check_cluster(_cfg(**{"train.use_gpu": True}), cpu_only)
    with pytest.raises(PreflightError, match=r"train\.num_workers.*train=3"):
        check_cluster(_cfg(**{"train.num_workers": 3}), cpu_only)  # 2 train nodes, 1 slot each
    check_cluster(_cfg(**{"train.num_workers": 2}), cpu_only)
    assert train_worker_bundle(_cfg(), cpu_only) == {"CPU": 1.0, "train": 1.0}
    big = ClusterView.from_nodes([{"CPU": 4.0}])
    with pytest.raises(PreflightError, match=r"train\.num_workers"):
        check_cluster(_cfg(**{"train.cpus_per_worker": 8}), big)


def test_config_and_corpus_checks_name_the_field():
    with pytest.raises(PreflightError, match=r"model\.arch: unknown backbone 'vit_huuuge'"):
        check_config(_cfg(**{"model.arch": "vit_huuuge"}))
    check_config(_cfg(**{"model.arch": "test_vit"}))
    with pytest.raises(PreflightError, match=r"train\.precision='fp16' needs a CUDA device"):
        check_config(_cfg(**{"train.precision": "fp16"}))
    check_config(_cfg(**{"train.precision": "fp16", "train.use_gpu": True}))
    for field, value in (("ibot.enabled", True), ("model.num_registers", 4)):
        with pytest.raises(PreflightError, match=rf"{field}: needs a ViT.*'resnet18'"):
            check_config(_cfg(**{"model.arch": "resnet18", "model.patch_size": 16, field: value}))
    check_config(_cfg(**{"ibot.enabled": True, "model.num_registers": 4}))  # ViT: fine
    with pytest.raises(PreflightError, match=r"train\.batch_size_per_worker.*128.*exceeds the 100"):
        check_corpus(_cfg(**{"train.batch_size_per_worker": 64, "train.num_workers": 2}), 100)


def test_deterministic_errors_are_not_retried_and_deaths_are():
    import ray.exceptions as rex
    from ray.train import WorkerGroupError

    from dino_model.step import NonFiniteLossError
    from pipeline.data.quality import DataQualityError

    died = rex.ActorDiedError()
    collateral = RuntimeError("gloo: Connection reset by peer")
    assert classify(WorkerGroupError("x", {0: collateral, 1: died})) == "retryable"
    nan = NonFiniteLossError("loss is nan")
    assert classify(WorkerGroupError("x", {0: nan, 1: collateral})) == "deterministic"
    assert root_cause(WorkerGroupError("x", {1: collateral, 0: nan})) is nan
    assert classify(WorkerGroupError("x", {0: DataQualityError("bad")})) == "deterministic"
    assert classify(WorkerGroupError("x", {0: OSError("S3 503 SlowDown")})) == "retryable"
    assert classify(WorkerGroupError("x", {0: ZeroDivisionError()})) == "deterministic"


def test_a_peer_lost_before_ray_reports_the_death_is_retried_and_a_bug_is_not():
    """A node's loss reaches its peers' collectives at once and Ray's health checks seconds
    later: the survivors' errors alone retry; a bug on one rank, with its peers' collateral
    errors, does not."""
    import torch.distributed as dist
    from ray.train import WorkerGroupError

    # what gloo raised in a surviving rank when its peer's process exited (torch 2.x)
    gloo = RuntimeError(
        "[gloo/transport/tcp/pair.cc:561] Connection closed by peer "
        "[127.0.0.1]:1759. This is typically caused by a remote worker crashing."
    )
    assert classify(WorkerGroupError("x", {0: gloo})) == "retryable"
    nccl = dist.DistBackendError("NCCL error: remote process exited or there was a network error")
    assert classify(WorkerGroupError("x", {0: nccl, 2: gloo})) == "retryable"
    assert classify(WorkerGroupError("x", {0: gloo, 1: ZeroDivisionError()})) == "deterministic"
    assert classify(WorkerGroupError("x", {0: RuntimeError("shape mismatch")})) == "deterministic"
