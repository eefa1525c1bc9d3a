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
    # spot capacity for elastic runs: the same train worker slot, on reclaimable instances
    spot = types["gpu_train_spot"]
    assert spot["resources"] == train and spot["node_config"]["InstanceMarketOptions"] == {
        "MarketType": "spot"
    }
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
    spot = groups["gpu-train-spot"]
    assert spot["rayStartParams"] == groups["gpu-train"]["rayStartParams"]
    assert "spot" in str(spot["template"]["spec"]["nodeSelector"])
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


def test_each_node_type_has_its_own_least_privilege_profile():
    """Issue 22, item 13: without a profile the head took Ray's broad default role and the data
    and train nodes had none (every S3 read failed there)."""
    cfg = _load("cluster.yaml")
    readme = (REPO / "README.md").read_text()
    arns = {}
    for name, node in cfg["available_node_types"].items():
        arn = node["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::ACCOUNT_ID:instance-profile/dino-ray-[a-z]+", arn), arn
        arns[name] = arn.rsplit("/", 1)[1]
    assert len(set(arns.values())) == len(arns)  # one role per node type, not one for all
    section = readme[readme.index("**Cluster credentials.**") :]
    for profile in arns.values():  # the README says what each role needs
        row = next(line for line in section.splitlines() if line.startswith(f"| `{profile}`"))
        assert "s3:GetObject" in row
    head_row = next(line for line in section.splitlines() if "| `dino-ray-head`" in line)
    assert "ec2:RunInstances" in head_row and "iam:PassRole" in head_row
    data_row = next(line for line in section.splitlines() if "| `dino-ray-data`" in line)
    assert "PutObject" not in data_row.split("|")[3]  # the data nodes only read


def test_deploy_files_pin_what_they_run():
    """Issue 22, item 15: no moving branch archive, `:latest` image or unchecked `curl | sh`."""
    cluster = (REPO / "cluster.yaml").read_text()
    setup = " ".join(_load("cluster.yaml")["setup_commands"])
    assert not re.search(r"curl[^|;&]*\|\s*(ba)?sh", setup), setup
    installer = re.search(r"releases/download/(\d+\.\d+\.\d+)/uv-installer\.sh", setup)
    assert installer and "sha256sum --check" in setup and "UV_INSTALLER_SHA256" in cluster
    job = _load("deploy/rayjob.yaml")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert re.fullmatch(
        r"https://github\.com/[^/]+/dino-ray/archive/(COMMIT_SHA|[0-9a-f]{40})\.zip",
        runtime_env["working_dir"],
    ), runtime_env["working_dir"]
    texts = [(REPO / "deploy" / n).read_text() for n in ("rayjob.yaml", "mlflow.yaml")]
    images = [m for t in texts for m in re.findall(r"image:\s*(\S+)", t)]
    assert len(images) >= 5
    for image in images:
        assert re.fullmatch(r"[^:@\s]+@sha256:([A-Z_]+|[0-9a-f]{64})", image), image
