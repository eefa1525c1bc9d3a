"""cluster.yaml against Ray's own cluster-config schema, and the KubeRay RayJob manifest."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    return yaml.safe_load((REPO / name).read_text())


def test_cluster_yaml_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load("cluster.yaml")
    # what `ray up` does: fill in the provider defaults, then check against ray-schema.json
    validate_config(prepare_config(copy.deepcopy(cfg)))
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["cpu_data"]["resources"]["data"] = "sixteen"
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        validate_config(prepare_config(broken))
    typo = copy.deepcopy(cfg)
    typo["setup_comands"] = typo.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(typo))


def test_cluster_node_types_and_resources():
    cfg = _load("cluster.yaml")
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["head"] == 1
    data = types["cpu_data"]["resources"]
    assert data["data"] == data["CPU"] and "GPU" not in data
    train = types["gpu_train"]["resources"]
    assert train["GPU"] >= 1 and train["train"] >= 1
    assert sum(t.get("max_workers", 0) for t in types.values()) >= 2
    setup = " ".join(cfg["setup_commands"])
    assert "uv sync" in setup and "dino-ray" in setup
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(
        r"(?i)(secret|password|aws_access_key|BEGIN [A-Z ]*PRIVATE KEY)\s*[:=]", text
    )


def test_rayjob_manifest():
    job = _load("deploy/rayjob.yaml")
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/train.py")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["resources"] == '"{\\"head\\": 1}"'
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"cpu-data", "gpu-train"} <= set(groups)
    gpu = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])


def test_cluster_configs_expose_nothing_and_name_only_shared_paths():
    cluster = (REPO / "cluster.yaml").read_text()
    assert "0.0.0.0" not in cluster and "--dashboard-host=127.0.0.1" in cluster
    cfg = _load("cluster.yaml")
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(cfg[commands])
    job = _load("deploy/rayjob.yaml")
    pods = [
        job["spec"]["submitterPodTemplate"]["spec"],
        job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
        *[g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]],
    ]
    for pod in pods:
        env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE") == "token"
    # the RayJob's entrypoint passes the multi-node preflight: every path on object storage
    import shlex

    from pipeline.config import DinoConfig
    from pipeline.preflight import local_path_fields

    args = shlex.split(job["spec"]["entrypoint"])
    config = args[args.index("--config") + 1]
    run = DinoConfig.load(REPO / config, [a for a in args if "=" in a and not a.startswith("-")])
    assert local_path_fields(run) == []
