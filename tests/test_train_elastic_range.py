"""``train.num_workers: [min, max]`` (issue 23): the config, preflight, the data plan, the sweep's
trial concurrency and the autoscaler request read the range (no Ray)."""

from __future__ import annotations

import pytest

from pipeline.cluster import ClusterView, NodeType
from pipeline.config import ConfigError, DinoConfig
from pipeline.data.resources import plan_from_config
from pipeline.preflight import PreflightError, check_cluster, check_corpus
from pipeline.train import plan as plan_module
from pipeline.tune.space import concurrent_trials

HEAD = {"CPU": 2.0, "head": 1.0, "node:__internal_head__": 1.0}


def _cfg(**updates) -> DinoConfig:
    return DinoConfig().with_overrides(
        {"data.path": "s3://bucket/corpus", "train.storage_path": "s3://bucket/runs", **updates}
    )


def test_num_workers_takes_a_count_or_a_range_with_one_line_errors():
    tc = _cfg(**{"train.num_workers": [1, 3]}).train
    assert (tc.num_workers, tc.min_workers, tc.max_workers) == ((1, 3), 1, 3)
    assert DinoConfig.load(None, ["train.num_workers=[2,4]"]).train.num_workers == (2, 4)
    assert _cfg(**{"train.num_workers": 2}).train.min_workers == 2
    for bad in ([3, 1], [0, 2], [1], [1, 2, 3], [1.5, 2], "two", True):
        with pytest.raises(ConfigError, match=r"train\.num_workers") as info:
            _cfg(**{"train.num_workers": bad})
        assert "\n" not in str(info.value) and str(info.value).count("train.num_workers") == 1


def test_preflight_places_the_min_and_sizes_the_epoch_by_the_max():
    two_train_nodes = ClusterView.from_nodes(
        [HEAD],
        [
            NodeType("data", {"CPU": 16.0, "data": 16.0}, 4),
            NodeType("train", {"CPU": 8.0, "train": 1.0}, 2),
        ],
    )
    check_cluster(_cfg(**{"train.num_workers": [2, 4]}), two_train_nodes)  # starts with 2
    with pytest.raises(PreflightError, match=r"train\.num_workers"):
        check_cluster(_cfg(**{"train.num_workers": [3, 4]}), two_train_nodes)
    with pytest.raises(PreflightError, match=r"128.*exceeds the 100"):
        check_corpus(_cfg(**{"train.batch_size_per_worker": 64, "train.num_workers": [1, 2]}), 100)


def test_the_data_plan_keeps_the_max_workers_cpus_and_a_sweep_counts_the_min():
    fixed = plan_from_config(_cfg().data, _cfg(**{"train.num_workers": 4}).train, cluster=32)
    elastic = _cfg(**{"train.num_workers": [1, 4]})
    assert plan_from_config(elastic.data, elastic.train, cluster=32) == fixed
    gpu = {"train.use_gpu": True, "data.num_actors": 1}
    assert concurrent_trials(_cfg(**gpu, **{"train.num_workers": [1, 4]}), {"CPU": 64, "GPU": 4})
    assert (
        concurrent_trials(
            _cfg(**gpu, **{"train.num_workers": [1, 4], "tune.num_samples": 8}),
            {"CPU": 64, "GPU": 4},
        )
        == 4  # one GPU each to start; they grow into what finished trials leave
    )


def test_the_autoscaler_is_asked_for_the_max(monkeypatch):
    asked = []
    monkeypatch.setattr(
        plan_module, "request_nodes", lambda bundles, view, run=None: asked.append(bundles)
    )
    view = ClusterView.from_nodes([HEAD], [NodeType("train", {"CPU": 8.0, "train": 1.0}, 4)])
    worker = {"CPU": 1.0, "train": 1.0}
    plan_module._request_nodes(
        _cfg(**{"train.num_workers": [1, 3], "data.num_actors": 1}), view, worker, None
    )
    assert asked[0].count(worker) == 3
