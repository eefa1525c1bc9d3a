"""Secrets (URI passwords, signed-URL keys) never reach MLflow, checkpoints or log lines."""

from __future__ import annotations

import logging

import torch
from live_services import shared_mlflow_server
from mlflow.tracking import MlflowClient

from pipeline.config import DinoConfig
from pipeline.redact import install_log_redaction, redact, redact_obj
from pipeline.tracking import Tracker

PW, SIG, TOKEN = "hunter2pw", "abcSIGxyz", "tok3nVALUE"
DATA = f"s3://alice:{PW}@minio.local/bucket/shards?X-Amz-Signature={SIG}&part=1"
TRACKING = f"https://bob:{PW}@mlflow.example/?token={TOKEN}"
SECRETS = (PW, SIG, TOKEN)


def _cfg() -> DinoConfig:
    return DinoConfig.load(
        None,
        [
            f"data.path={DATA}",
            f"tracking.tracking_uri={TRACKING}",
            "train.epochs=1",
            "loss.warmup_teacher_temp_epochs=0",
        ],
    )


def _clean(text: str) -> bool:
    return not any(s in text for s in SECRETS)


def test_redact_uris_query_keys_and_nested_objects():
    assert redact(DATA) == "s3://alice:***@minio.local/bucket/shards?X-Amz-Signature=***&part=1"
    assert redact(TRACKING) == "https://bob:***@mlflow.example/?token=***"
    assert (
        redact("gs://b/o?GoogleAccessId=me&Expires=9&Signature=zz")
        == "gs://b/o?GoogleAccessId=***&Expires=9&Signature=***"
    )
    assert redact("http://host:5000/x?keyword=1&user=a") == "http://host:5000/x?keyword=1&user=a"
    assert redact(redact(DATA)) == redact(DATA)  # idempotent
    assert redact(3) == 3
    nested = redact_obj({"a": [DATA, {"b": (TRACKING,)}], "n": 1})
    assert _clean(repr(nested)) and nested["n"] == 1 and "alice:***@" in nested["a"][0]


def test_config_flat_and_yaml_redact_only_when_asked():
    cfg = _cfg()
    assert _clean(cfg.to_yaml(redact=True)) and _clean(repr(cfg.flat(redact=True)))
    assert cfg.flat()["data.path"] == DATA  # the run itself keeps the real value
    assert DinoConfig.load(None, []).to_yaml() == DinoConfig.load(None, []).to_yaml(redact=True)


def test_nothing_secret_in_mlflow_params_tags_artifacts(tmp_path):
    server = shared_mlflow_server()
    cfg = _cfg()
    t = Tracker(server.uri, "redact", run_name="secret-run", tags={"origin": TRACKING})
    t.log_params(cfg.flat())  # what the trainer sends today: the tracker redacts on its own
    t.set_tags({"storage_path": DATA})
    user_file = tmp_path / "user_config.yaml"
    user_file.write_text(cfg.to_yaml())
    t.log_artifact(user_file)
    t.log_text(cfg.to_yaml(), "resolved_config.yaml")
    t.finish("FINISHED", timeout_s=120)

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.path"] == redact(DATA)
    assert _clean(repr(run.data.params)) and _clean(repr(run.data.tags))
    names = sorted(a.path for a in client.list_artifacts(t.run_id))
    assert names == ["resolved_config.yaml", "user_config.yaml"]
    client.download_artifacts(t.run_id, "", str(tmp_path / "dl"))
    for name in names:
        text = (tmp_path / "dl" / name).read_text()
        assert "alice:***@" in text and _clean(text)


def test_checkpoint_config_yaml_has_no_secret(tmp_path):
    from pipeline.checkpoints import CONFIG_FILE, load_config, save_checkpoint

    net = torch.nn.Linear(2, 2)
    save_checkpoint(
        tmp_path / "ck",
        student=net,
        teacher=net,
        center=torch.zeros(2),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        epoch=0,
        global_step=1,
        iters_per_epoch=1,
        cfg=_cfg(),
    )
    text = (tmp_path / "ck" / CONFIG_FILE).read_text()
    assert _clean(text) and "alice:***@" in text
    assert load_config(tmp_path / "ck").data.path == redact(DATA)  # still a valid config


def test_dino_ray_log_lines_are_redacted(caplog):
    install_log_redaction()
    caplog.set_level(logging.INFO)
    logging.getLogger("dino_ray.data").warning("reading %s", DATA)
    try:
        raise OSError(f"cannot open {TRACKING}")
    except OSError:
        logging.getLogger("dino_ray.tracking").exception("upload failed")
    logging.getLogger("someone.else").warning("untouched %s", "x?token=1")
    text = caplog.text
    assert "reading s3://alice:***@" in text and "cannot open https://bob:***@" in text
    assert _clean(text)
    assert "untouched x?token=1" in text  # other packages' loggers are not rewritten
