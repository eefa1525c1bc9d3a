"""``champion`` against a real ``mlflow server``: only versions evaluated on the same data and
settings (same eval_key) compete, on the source run's ``knn_top1`` metric, never on a tag."""

from __future__ import annotations

import pytest
from live_services import shared_mlflow_server
from presets import tiny_config

from pipeline.checkpoints import build_models
from pipeline.registry.champion import champion_alias, update_champion
from pipeline.registry.eval_key import eval_identity, eval_key
from pipeline.registry.register import EvalKeyConflictError, register_teacher

NAME = "champ-teacher"
OTHER_DATA = "s3://reader:hunter2@minio.local/corpora/other?X-Amz-Signature=abc"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits_dir):
    from mlflow import MlflowClient

    uri = shared_mlflow_server().uri
    root = tmp_path_factory.mktemp("champ")
    same = tiny_config(digits_dir, root / "runs", "champ")
    other = tiny_config(OTHER_DATA, root / "runs", "champ")
    _, teacher = build_models(same, seed=0)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def register(cfg, metrics, **kw) -> int:
        return register_teacher(
            teacher.backbone, cfg, metrics=metrics, tracking_uri=uri, name=NAME, **kw
        )

    return client, register, same, other


def _alias(client, alias: str) -> int:
    return int(client.get_model_version_by_alias(NAME, alias).version)


def test_eval_key_separates_settings(digits_dir, tmp_path):
    base = tiny_config(digits_dir, tmp_path, "k")
    assert eval_key(eval_identity(base)) == eval_key(
        eval_identity(tiny_config(digits_dir, tmp_path / "elsewhere", "k2", train__seed=7))
    )  # seed, storage, name: same
    for change in (
        {"eval__headline_k": 10},
        {"eval__temperature": 0.1},
        {"eval__val_fraction": 0.3},
        {"augment__global_size": 48},
        {"eval__resize": 40},
        {"data__limit": 64},
    ):
        assert eval_key(
            eval_identity(tiny_config(digits_dir, tmp_path, "k", **change))
        ) != eval_key(eval_identity(base)), change
    ident = eval_identity(tiny_config(OTHER_DATA, tmp_path, "k"))
    assert "hunter2" not in str(ident) and "abc" not in str(ident)


def test_champion_only_among_comparable_versions(setup):
    client, register, same, other = setup
    key_same, key_other = (eval_key(eval_identity(c)) for c in (same, other))

    v1 = register(same, {"knn_top1": 0.5})
    assert _alias(client, "champion") == v1
    assert _alias(client, champion_alias(key_same)) == v1
    mv = client.get_model_version(NAME, str(v1))
    assert mv.tags["eval_key"] == key_same and mv.tags["eval.headline_k"] == "20"

    # a far better figure on other data: its own champion-<key>, not the champion
    v2 = register(other, {"knn_top1": 0.9})
    assert _alias(client, "champion") == v1
    assert _alias(client, champion_alias(key_other)) == v2
    tags = client.get_model_version(NAME, str(v2)).tags
    assert "hunter2" not in tags["data"] and "***" in tags["data"]

    # a worse version on the same data, whose tag is then edited by hand to a huge figure
    v3 = register(same, {"knn_top1": 0.4})
    client.set_model_version_tag(NAME, str(v3), "knn_top1", "1e9")
    assert update_champion(client, NAME) == v1
    assert _alias(client, "champion") == v1 and _alias(client, champion_alias(key_same)) == v1

    # no comparable figure: never takes champion
    v4 = register(same, {})
    assert _alias(client, "champion") == v1
    assert (
        "knn_top1"
        not in client.get_run(client.get_model_version(NAME, str(v4)).run_id).data.metrics
    )

    # a better version on the same data does
    v5 = register(same, {"knn_top1": 0.7})
    assert _alias(client, "champion") == v5 and _alias(client, champion_alias(key_same)) == v5
    assert _alias(client, champion_alias(key_other)) == v2

    # a run that records one evaluation setting refuses a registration with another
    run_id = client.get_model_version(NAME, str(v5)).run_id
    with pytest.raises(EvalKeyConflictError, match="eval_key"):
        register(other, {"knn_top1": 0.99}, run_id=run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
