"""The in-training k-NN reads a bounded, seeded, class-balanced subset of the eval images (rank 0
holds them in memory: all of ImageNet would be ~190 GB in one object)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import DinoConfig
from pipeline.data.eval_sets import materialize_for_training


@pytest.mark.ray
def test_in_training_eval_set_is_bounded_and_class_balanced(ray_session, digits_dir):
    cfg = DinoConfig().with_overrides(
        {
            "data.path": str(digits_dir),
            "augment.global_size": 16,
            "eval.resize": 16,
            "eval.in_training_limit": 200,
            "eval.val_fraction": 0.25,
        }
    )
    data = materialize_for_training(cfg.model_dump(mode="json"))
    n_bank, n_val = len(data["bank_labels"]), len(data["val_labels"])
    assert n_bank + n_val == 200 and 20 < n_val < 80  # the digits corpus has 1,797 images
    counts = np.bincount(np.concatenate([data["bank_labels"], data["val_labels"]]), minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22  # every class, evenly
    again = materialize_for_training(cfg.model_dump(mode="json"))
    np.testing.assert_array_equal(again["val_images"], data["val_images"])  # seeded
