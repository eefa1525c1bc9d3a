"""A 2-trial sweep (grid over the teacher temperature) with ASHA on the shared in-process Ray,
tracked in a real ``mlflow server``: child runs under one parent, results CSV + plot on the
parent, the best teacher registered as champion."""

from __future__ import annotations

import csv

import pytest
from live_services import shared_mlflow_server
from presets import tiny_config

from pipeline.config import DinoConfig
from pipeline.tune.space import concurrent_trials, param_space, trial_cpus


def test_concurrency_from_cluster_resources():
    cfg = DinoConfig().with_overrides(
        {
            "train.num_workers": 2,
            "train.cpus_per_worker": 2,
            "data.num_actors": 2,
            "data.cpus_per_actor": 1,
            "tune.num_samples": 10,
        }
    )
    assert trial_cpus(cfg) == pytest.approx(4 + 2 + 0.25 + 0.1)
    assert concurrent_trials(cfg, {"CPU": 32}) == 5
    assert concurrent_trials(cfg, {"CPU": 4}) == 1  # never 0: one trial waits for resources
    assert (
        concurrent_trials(cfg.with_overrides({"tune.max_concurrent_trials": 2}), {"CPU": 64}) == 2
    )
    gpu = cfg.with_overrides({"train.use_gpu": True})
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 4}) == 2
    with pytest.raises(ValueError, match="nope"):
        param_space(cfg.with_overrides({"tune.search_space": {"loss.nope": [1, 2]}}))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~4 min on an idle 2-core machine; far more when it is shared
def test_two_trial_sweep_registers_best(tmp_path, digits_dir, ray_session, capsys):
    from mlflow import MlflowClient

    from pipeline.cli import main

    uri = shared_mlflow_server().uri
    cfg = tiny_config(
        digits_dir,
        tmp_path / "runs",
        "sw",
        train__epochs=2,
        train__max_steps_per_epoch=1,
        eval__limit=120,
        data__limit=200,
    )
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(cfg.to_yaml())
    rc = main(
        [
            "tune",
            "--config",
            str(cfg_file),
            "--name",
            "sw-test",
            "--results-dir",
            str(tmp_path / "results"),
            f"eval.test_path={digits_dir}",
            "tracking.enabled=true",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment=sweeps",
            "tracking.registered_model=sweep-teacher",
            'tune.search_space={"loss.teacher_temp": [0.04, 0.07]}',
            "tune.grid=true",
            "tune.num_samples=1",
            "tune.grace_period=1",
            "tune.reduction_factor=2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "loss.teacher_temp" in out and "knn_top1" in out  # the printed table

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("sweeps")
    parent = client.search_runs([exp.experiment_id], "attributes.run_name = 'sw-test'")[0]
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    assert {c.data.tags["trial.loss.teacher_temp"] for c in children} == {"0.04", "0.07"}
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_results.csv", "sweep_results.png"} <= arts

    local = client.download_artifacts(parent.info.run_id, "sweep_results.csv", str(tmp_path))
    rows = list(csv.DictReader(open(local)))
    assert len(rows) == 2 and all(r["status"] == "OK" for r in rows)
    finished = [r for r in rows if r["stopped_early"] == "False"]
    best = max(finished, key=lambda r: float(r["knn_top1"]))

    champion = client.get_model_version_by_alias("sweep-teacher", "champion")
    assert champion.tags["sweep"] == "sw-test"
    assert champion.tags["trial_id"] == best["trial_id"]
    assert float(champion.tags["knn_top1"]) == pytest.approx(float(best["knn_top1"]), abs=1e-4)
    assert champion.run_id == best["mlflow_run_id"]
    assert parent.data.tags["best_trial"] == best["trial_id"]
    # the test split: reported once, for the best trial, after the selection; no trial saw it
    assert "test_knn_top1" in parent.data.metrics
    assert not any("test_knn_top1" in c.data.metrics for c in children)
    assert float(champion.tags["test_knn_top1"]) == pytest.approx(
        parent.data.metrics["test_knn_top1"], abs=1e-4
    )  # for people to read, not to choose
    report = (tmp_path / "results" / "sw-test.md").read_text()
    assert best["trial_id"] in report and "test split" in report
    assert (tmp_path / "results" / "sw-test.csv").exists()


def test_placement_group_left_by_a_stopped_trial_is_released(ray_session):
    """A trial stopped by ASHA cannot remove its workers' placement group: the sweep's callback
    removes the groups created during the trial once it has ended (and only then)."""
    from types import SimpleNamespace

    import ray
    from ray.util.placement_group import placement_group

    from pipeline.tune.placement import ReleaseTrialPlacementGroups
    from pipeline.tune.space import DRIVER_RESOURCES

    def state(pg) -> str:
        return ray.util.placement_group_table(pg)["state"]

    older = placement_group([{"CPU": 0.01}])
    ray.get(older.ready())
    cb = ReleaseTrialPlacementGroups(DRIVER_RESOURCES)
    first, second = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    cb.on_trial_start(0, [], first)
    leaked = placement_group([{"CPU": 0.01}, {"CPU": 0.01}])
    tune_own = placement_group([dict(DRIVER_RESOURCES)])
    ray.get([leaked.ready(), tune_own.ready()])
    cb.on_trial_start(0, [], second)
    cb.on_trial_complete(0, [], first)  # another trial still runs: nothing is touched
    assert state(leaked) == "CREATED"
    cb.on_trial_complete(0, [], second)
    cb.on_trial_start(0, [], first)
    cb.on_trial_error(0, [], first)
    assert state(older) == state(tune_own) == "CREATED"
    cb.before = {"a": set()}
    cb.on_trial_complete(0, [], first)
    assert state(leaked) == "REMOVED" and state(tune_own) == "CREATED"
    ray.util.remove_placement_group(older)
    ray.util.remove_placement_group(tune_own)
