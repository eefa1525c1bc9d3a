"""The CPU split between Train and Ray Data, and a real pipeline that finishes while 'Train'
holds its CPUs (the ray#44687 situation)."""

from __future__ import annotations

import pytest
import ray

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.dataset import build_train_dataset
from pipeline.data.resources import ResourceError, plan_data_resources


def test_plan_leaves_headroom_and_fits_the_pool():
    p = plan_data_resources(16, num_workers=2, cpus_per_worker=4, num_actors=8, cpus_per_actor=1)
    assert p.train_cpus == 8 and p.headroom_cpus == 1.6
    assert p.train_cpus + p.data_cpus + p.headroom_cpus <= 16
    assert p.num_actors == 6 and p.num_actors * p.cpus_per_actor + p.read_cpus <= p.data_cpus
    assert any("num_actors 8 lowered to 6" in n for n in p.notes)


def test_plan_respects_requested_pool_and_limit():
    p = plan_data_resources(32, 1, 1, num_actors=2, cpus_per_actor=2, data_cpu_limit=10)
    assert p.num_actors == 2 and p.data_cpus == 10 and p.cpus_per_actor == 2
    assert p.execution_options().resource_limits.cpu == 10


def test_plan_shrinks_actor_cpus_on_a_tiny_cluster():
    # embedded cluster on 2 cores: 4 logical CPUs, one worker with 2 CPUs
    p = plan_data_resources(4, 1, 2, num_actors=2, cpus_per_actor=1)
    assert p.data_cpus == 1 and p.num_actors == 1 and p.cpus_per_actor == 0.75
    assert p.train_cpus + p.data_cpus + p.headroom_cpus <= 4


def test_plan_error_names_the_shortfall():
    with pytest.raises(ResourceError, match="cluster has 4 CPUs but training takes 3"):
        plan_data_resources(4, 3, 1)


@ray.remote
class _Hog:
    """Stands in for a Train worker holding its CPUs for the whole run."""

    def ping(self) -> int:
        return 1


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_planned_pipeline_runs_while_train_holds_its_cpus(ray_session, digits_dir):
    total = ray.cluster_resources()["CPU"]
    workers, per_worker = 2, 2.0
    plan = plan_data_resources(total, workers, per_worker, num_actors=4, cpus_per_actor=1)
    hogs = [_Hog.options(num_cpus=per_worker).remote() for _ in range(workers)]
    try:
        assert ray.get([h.ping.remote() for h in hogs]) == [1, 1]
        td = build_train_dataset(
            DataConfig(path=str(digits_dir), limit=48, map_batch_size=8),
            AugmentConfig(global_size=16, local_size=8, num_local=1),
            seed=0,
            plan=plan,
        )
        assert td.dataset.context.execution_options.resource_limits.cpu == plan.data_cpus
        n = sum(len(b["global_0"]) for b in td.dataset.iter_torch_batches(batch_size=16))
        assert n == 48
    finally:
        for h in hogs:
            ray.kill(h)


def test_plan_object_store_cap_from_config():
    from pipeline.config import TrainConfig
    from pipeline.data.resources import plan_from_config

    p = plan_from_config(
        DataConfig(object_store_limit_mib=256, num_actors=2), TrainConfig(num_workers=1), cluster=8
    )
    assert p.object_store_bytes == 256 * 2**20
    assert p.execution_options().resource_limits.object_store_memory == 256 * 2**20
    assert p.num_actors == 2 and p.data_cpus == 6
