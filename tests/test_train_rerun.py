"""Reruns on purpose: a changed config under an existing name is refused with the fields listed;
more epochs continue; train.resume=changed / never (no Ray)."""

from __future__ import annotations

import pytest

from pipeline.config import DinoConfig
from pipeline.preflight import PreflightError
from pipeline.train.rerun import check_rerun


def _cfg(**updates) -> DinoConfig:
    return DinoConfig().with_overrides({"train.name": "a", "data.path": "s3://u:pw@b/c", **updates})


def test_new_run_and_same_config_continue():
    cfg = _cfg()
    assert check_rerun(cfg, None) == (cfg, False)
    saved = cfg.to_yaml(redact=True)  # what a checkpoint holds
    assert check_rerun(cfg, saved) == (cfg, False)
    more = _cfg(
        **{
            "train.epochs": 300,
            "train.max_failures": 3,
            "eval.every_epochs": 5,
            "tracking.tracking_uri": "http://h:5000",
            "data.num_actors": 8,
        }
    )
    assert check_rerun(more, saved) == (more, False)  # operational changes never block


def test_changed_config_is_refused_with_the_fields_listed():
    saved = _cfg().to_yaml(redact=True)
    changed = _cfg(**{"optim.lr": 0.01, "augment.num_local": 2})
    with pytest.raises(PreflightError) as info:
        check_rerun(changed, saved)
    msg = str(info.value)
    assert "optim.lr 0.0005 -> 0.01" in msg and "augment.num_local 8 -> 2" in msg
    assert "train.resume=changed" in msg and "pw" not in msg
    ok = changed.with_overrides({"train.resume": "changed"})
    assert check_rerun(ok, saved) == (ok, True)
    fresh, cont = check_rerun(changed.with_overrides({"train.resume": "never"}), saved)
    assert not cont and fresh.train.name.startswith("a-") and fresh.optim.lr == 0.01
