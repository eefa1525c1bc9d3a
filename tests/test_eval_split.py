"""The k-NN validation split is carved out of the SSL training data: disjoint, and stratified in
expectation (a per-image hash, so the split is the same whatever subset or path is listed)."""

from __future__ import annotations

import numpy as np

from pipeline.config import DinoConfig
from pipeline.data.sources import list_corpus
from pipeline.data.split import image_keys, split_indices
from pipeline.train.plan import ssl_indices


def test_ssl_training_never_sees_the_validation_split(digits_dir):
    cfg = DinoConfig().with_overrides(
        {"data.path": str(digits_dir), "eval.every_epochs": 1, "eval.val_fraction": 0.2}
    )
    corpus = list_corpus(str(digits_dir))
    train = ssl_indices(cfg, corpus)
    bank, val = split_indices(corpus, 0.2, cfg.train.seed)  # what the evaluation uses
    assert set(train.tolist()) == set(bank.tolist())
    assert not set(train.tolist()) & set(val.tolist())
    assert len(train) + len(val) == corpus.num_images
    labels = np.asarray(corpus.entries.column("label").to_pylist())
    for c in np.unique(labels):  # every class is in the split at about its share
        share = np.isin(np.flatnonzero(labels == c), val).mean()
        assert 0.1 < share < 0.3, (c, share)
    # the same images are validation whatever subset is listed (eval.limit vs data.limit)
    subset = list_corpus(str(digits_dir), limit=500)
    _, sub_val = split_indices(subset, 0.2, cfg.train.seed)
    keys, sub_keys = image_keys(corpus), image_keys(subset)
    assert {sub_keys[i] for i in sub_val} <= {keys[i] for i in val}
    # an explicit validation set, or no evaluation: SSL uses everything
    assert (
        ssl_indices(
            cfg.with_overrides({"eval.val_path": "s3://b/val", "eval.train_path": "s3://b/t"}),
            corpus,
        )
        is None
    )
    assert (
        ssl_indices(cfg.with_overrides({"eval.every_epochs": 0, "eval.at_end": False}), corpus)
        is None
    )
