"""Linear probe on frozen features: the classifier on toy sets, DINO's ViT features via timm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dino_model.backbone import build_backbone
from dino_model.features import embed
from dino_model.linear_probe import DEFAULT_CS, LinearProbeError, linear_probe, probe_features


def _blobs(seed: int, n: int = 400, classes: int = 4):
    from sklearn.datasets import make_blobs
    from sklearn.model_selection import train_test_split

    x, y = make_blobs(
        n_samples=n, centers=classes, n_features=8, cluster_std=1.5, random_state=seed
    )
    return train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)


def test_probe_separates_gaussian_blobs():
    x_tr, x_te, y_tr, y_te = _blobs(0)
    r = linear_probe(x_tr, y_tr, x_te, y_te, seed=0)
    assert r.top1 > 90.0  # chance is 25%
    assert r.C in DEFAULT_CS and r.holdout_top1 > 90.0


def test_probe_near_chance_on_shuffled_labels():
    x_tr, x_te, y_tr, y_te = _blobs(1)
    rng = np.random.default_rng(0)
    r = linear_probe(x_tr, rng.permutation(y_tr), x_te, rng.permutation(y_te), seed=0)
    assert r.top1 < 45.0  # chance is 25% (160 test points: a few points of noise)


def test_probe_rejects_single_class_bank():
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(LinearProbeError, match="2 classes"):
        linear_probe(x, np.zeros(20), x, np.zeros(20))


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("test_vit", img_size=32, patch_size=4).eval()


def test_probe_features_shapes_and_tokens(tiny_vit):
    x = torch.randn(3, 3, 32, 32)
    d = tiny_vit.embed_dim
    cls = tiny_vit(x)
    assert torch.equal(probe_features(tiny_vit, x), cls)  # the default is the k-NN feature
    f = probe_features(tiny_vit, x, n_last_blocks=4, avgpool=True)
    assert f.shape == (3, d * 5)
    # the last CLS chunk is the final-norm CLS token; the pooled chunk the mean patch token
    torch.testing.assert_close(f[:, 3 * d : 4 * d], cls, atol=1e-5, rtol=1e-5)
    patches = tiny_vit.forward_features(x)[:, tiny_vit.num_prefix_tokens :]
    torch.testing.assert_close(f[:, 4 * d :], patches.mean(dim=1), atol=1e-5, rtol=1e-5)
    # earlier blocks give other tokens than the last one
    assert not torch.allclose(f[:, :d], cls, atol=1e-3)
    assert probe_features(tiny_vit, x, n_last_blocks=2).shape == (3, d * 2)


def test_embed_uint8_with_probe_options(tiny_vit):
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    f = embed(tiny_vit, images, batch_size=2, n_last_blocks=4, avgpool=False)
    assert f.shape == (5, tiny_vit.embed_dim * 4) and f.dtype == torch.float32


def test_probe_options_rejected_where_they_cannot_apply(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(LinearProbeError, match="at most 6"):
        probe_features(tiny_vit, x, n_last_blocks=7)
    cnn = build_backbone("resnet18", img_size=32).eval()
    with pytest.raises(LinearProbeError, match="timm ViT"):
        probe_features(cnn, x, avgpool=True)
