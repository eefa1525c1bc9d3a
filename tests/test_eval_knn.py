"""k-NN evaluation as Ray Data batch inference (actor pool holding the backbone) on real digits."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluate.features import knn_metrics
from pipeline.evaluate.knn_eval import build_eval_sets, evaluate_knn
from pipeline.train.presets import tiny_config


def test_knn_metrics_names_and_perfect_separation():
    bank = torch.eye(4).repeat(5, 1)
    labels = torch.arange(4).repeat(5)
    out = knn_metrics(bank, labels, torch.eye(4), torch.arange(4), ks=[1, 3], temperature=0.07)
    assert out["knn_top1_k1"] == 100.0 and out["knn_top1_k3"] == 100.0 and out["knn_top1"] == 100.0
    shuffled = knn_metrics(bank, labels, torch.eye(4), torch.tensor([1, 2, 3, 0]), ks=[1],
                           temperature=0.07)
    assert shuffled["knn_top1"] == 0.0


@pytest.mark.ray
def test_random_init_knn_on_digits_split(ray_session, digits_dir, tmp_path):
    cfg = tiny_config(digits_dir, tmp_path, "ev", eval__k=[10, 20], data__limit=None)
    sets = build_eval_sets(cfg)
    assert sets is not None
    out = evaluate_knn(cfg, None, sets=sets, include_random_init=True)
    assert out["knn_init_bank_size"] + out["knn_init_val_size"] == 1797
    assert 0.1 < out["knn_init_val_size"] / 1797 < 0.3  # eval.val_fraction = 0.2
    # a random ViT on digits is far above chance (10%) but not perfect
    assert 30.0 < out["knn_init_top1"] < 100.0
    assert set(out) >= {"knn_init_top1_k10", "knn_init_top5_k20"}
