"""k-NN evaluation as Ray Data batch inference (actor pool holding the backbone) on real digits:
fixed-k headline, raw-pixel baseline, linear probe, the `dino-ray evaluate` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from presets import tiny_config

from dino_model.features import embed, pixel_features
from dino_model.knn import knn_metrics
from pipeline.data.eval_sets import build_eval_sets, materialize
from pipeline.evaluate.knn_eval import evaluate_knn
from pipeline.train.knn import pixel_knn_metrics


def test_knn_metrics_names_and_perfect_separation():
    bank = torch.eye(4).repeat(5, 1)
    labels = torch.arange(4).repeat(5)
    out = knn_metrics(
        bank, labels, torch.eye(4), torch.arange(4), ks=[1, 3], temperature=0.07, headline_k=3
    )
    assert out["knn_top1_k1"] == 100.0 and out["knn_top1_k3"] == 100.0 and out["knn_top1"] == 100.0
    shuffled = knn_metrics(
        bank,
        labels,
        torch.eye(4),
        torch.tensor([1, 2, 3, 0]),
        ks=[1],
        temperature=0.07,
        headline_k=1,
    )
    assert shuffled["knn_top1"] == 0.0


def test_headline_is_the_fixed_k_not_the_best_k():
    """k=1 is right (100%), k=3 wrong (0%) under a flat temperature: the headline is k=3's figure
    because headline_k=3, and it is computed although it is not in ks."""
    bank = torch.tensor([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866]])
    out = knn_metrics(
        bank,
        torch.tensor([0, 1, 1]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([0]),
        ks=[1],
        temperature=100.0,
        headline_k=3,
    )
    assert out["knn_top1_k1"] == 100.0 and out["knn_top1_k3"] == 0.0
    assert out["knn_top1"] == out["knn_top1_k3"] and out["knn_top5"] == out["knn_top5_k3"]


def _numpy_weighted_knn(bank_x, bank_y, query_x, query_y, k, temperature, n_classes):
    """Direct cosine-weighted k-NN top-1 (percent) on flattened uint8 pixels."""
    b = bank_x.reshape(len(bank_x), -1).astype(np.float64)
    q = query_x.reshape(len(query_x), -1).astype(np.float64)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ b.T
    hits = 0
    for i in range(len(q)):
        nn = np.argsort(-sims[i])[:k]
        scores = np.zeros(n_classes)
        np.add.at(scores, bank_y[nn], np.exp(sims[i, nn] / temperature))
        hits += int(scores.argmax() == query_y[i])
    return 100.0 * hits / len(q)


def test_pixel_knn_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    # three classes of 6x6 images around different mean colours, plus noise
    centres = rng.integers(40, 215, size=(3, 1, 1, 3))
    bank_y, query_y = rng.integers(0, 3, 60), rng.integers(0, 3, 25)

    def draw(y):
        return np.clip(centres[y] + rng.normal(0, 60, (len(y), 6, 6, 3)), 0, 255).astype(np.uint8)

    bank_x, query_x = draw(bank_y), draw(query_y)
    feats_b, feats_q = pixel_features(bank_x), pixel_features(query_x)
    assert feats_b.shape == (60, 108)
    torch.testing.assert_close(feats_b.norm(dim=1), torch.ones(60))
    out = knn_metrics(
        feats_b,
        bank_y,
        feats_q,
        query_y,
        ks=[1, 5, 20],
        temperature=0.07,
        prefix="knn_pixels",
        headline_k=20,
    )
    for k in (1, 5, 20):
        expected = _numpy_weighted_knn(bank_x, bank_y, query_x, query_y, k, 0.07, 3)
        assert out[f"knn_pixels_top1_k{k}"] == pytest.approx(expected)
    assert out["knn_pixels_top1"] == out["knn_pixels_top1_k20"]


@pytest.mark.ray
def test_random_init_and_pixel_knn_on_digits_split(ray_session, digits_dir, tmp_path):
    cfg = tiny_config(digits_dir, tmp_path, "ev", eval__k=[10, 30], data__limit=None)
    sets = build_eval_sets(cfg)
    assert sets is not None
    out = evaluate_knn(cfg, None, sets=sets, include_random_init=True)
    assert out["knn_init_bank_size"] + out["knn_init_val_size"] == 1797
    assert 0.1 < out["knn_init_val_size"] / 1797 < 0.3  # eval.val_fraction = 0.2
    # a random ViT on digits is far above chance (10%) but not perfect
    assert 30.0 < out["knn_init_top1"] < 100.0
    assert set(out) >= {"knn_init_top1_k10", "knn_init_top5_k30", "knn_init_top1_k20"}
    assert out["knn_init_top1"] == out["knn_init_top1_k20"]  # eval.headline_k, not the best k
    assert "knn_top1" not in out and "linear_init_top1" not in out  # no checkpoint, no --linear
    # the evaluation counts what it read (and would count what it skipped: none here)
    assert out["eval_images_decoded"] == out["knn_init_bank_size"] + out["knn_init_val_size"]
    assert not any(k.startswith("eval_skipped_") for k in out)
    # the pixel baseline of the pass equals one computed on the same images in memory
    bank_x, bank_y = materialize(sets.bank)
    val_x, val_y = materialize(sets.val)
    direct = pixel_knn_metrics(
        {"bank_images": bank_x, "bank_labels": bank_y, "val_images": val_x, "val_labels": val_y},
        cfg,
    )
    assert out["knn_pixels_val_size"] == len(val_y) == out["knn_init_val_size"]
    for k in (10, 20, 30):
        assert out[f"knn_pixels_top1_k{k}"] == pytest.approx(direct[f"subset_knn_pixels_top1_k{k}"])
    assert 50.0 < out["knn_pixels_top1"] <= 100.0  # pixel k-NN on digits is strong


@pytest.fixture
def saved_checkpoint(digits_dir, tmp_path):
    """(a real checkpoint, the teacher backbone it saved, in memory). The teacher is built from
    another seed than the run's, so it differs from the random init ``knn_init`` re-creates: a
    loader that ignored the saved weights would embed with the init instead."""
    from pipeline.checkpoints import build_models, save_checkpoint

    # 16 px crops keep the probe cheap (768 pixel dims); all digits, so every class is in the bank
    cfg = tiny_config(
        digits_dir, tmp_path, "ck", data__limit=None, augment__global_size=16, augment__local_size=8
    )
    student, _ = build_models(cfg, seed=cfg.train.seed)
    _, teacher = build_models(cfg, seed=cfg.train.seed + 1)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    path = save_checkpoint(
        tmp_path / "ckpt",
        student=student,
        teacher=teacher,
        center=torch.zeros(1, cfg.model.out_dim),
        optimizer=opt,
        epoch=0,
        global_step=0,
        iters_per_epoch=1,
        cfg=cfg,
    )
    return str(path), teacher.backbone.eval()


@pytest.mark.ray
def test_evaluation_embeds_with_the_saved_teacher(ray_session, saved_checkpoint):
    """Row by row, the pass's checkpoint features (k-NN and DINO's probe features) are the saved
    in-memory teacher's on that row's crop, and its init features are not."""
    from pipeline.checkpoints import load_config, random_init_backbone
    from pipeline.evaluate.knn_eval import embed_sets

    path, teacher = saved_checkpoint
    cfg = load_config(path).with_overrides({"eval.limit": 100})
    probe = {"n_last_blocks": 2, "avgpool": True}
    feats = embed_sets(build_eval_sets(cfg), cfg, path, True, include_pixels=True, probe=probe)
    init = random_init_backbone(cfg)
    size = cfg.augment.global_size
    for split in (0, 2):  # bank, val
        pixels = feats["knn_pixels"][split].numpy().reshape(-1, size, size, 3)
        assert len(pixels) > 10
        want = embed(teacher, pixels)
        torch.testing.assert_close(feats["knn"][split], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            feats["probe"][split], embed(teacher, pixels, **probe), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(feats["knn_init"][split], embed(init, pixels))
        assert (want - feats["knn_init"][split]).abs().max() > 1e-2  # the test can tell them apart


@pytest.mark.ray
def test_evaluate_command_linear_probe(ray_session, saved_checkpoint, capsys):
    from pipeline.checkpoints import load_config
    from pipeline.cli import main

    path, teacher = saved_checkpoint
    # 600 of the 1,797 digits (60 a class): three probes of 4 C values each stay cheap
    rc = main(["evaluate", path, "eval.limit=600", "--linear", "--n-last-blocks", "2", "--avgpool"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # the summary is the last JSON object printed; a worker's line may still follow it
    start = captured.out.rfind('{\n "checkpoint"')
    m = json.JSONDecoder().raw_decode(captured.out[start:])[0] if start >= 0 else None
    assert m is not None, captured.out[-3000:]
    # the k-NN figures are those of the saved in-memory teacher on the same crops (k-NN does not
    # depend on the order of the bank; the probe's hold-out split does, so it is checked by range)
    cfg = load_config(path).with_overrides({"eval.limit": 600})
    sets = build_eval_sets(cfg)
    bank_x, bank_y = materialize(sets.bank)
    val_x, val_y = materialize(sets.val)
    want = knn_metrics(
        embed(teacher, bank_x),
        bank_y,
        embed(teacher, val_x),
        val_y,
        ks=cfg.eval.k,
        temperature=cfg.eval.temperature,
        headline_k=cfg.eval.headline_k,
    )
    figures = [k for k in want if k.startswith("knn_top")]
    assert len(figures) >= 4
    assert {k: m[k] for k in figures} == pytest.approx({k: want[k] for k in figures})
    init = {k: m[k.replace("knn_", "knn_init_")] for k in figures}
    assert init != pytest.approx({k: want[k] for k in figures})  # the init's figures differ
    assert m["linear_n_last_blocks"] == 2 and m["linear_avgpool"] == 1
    assert m["linear_top1"] > 30.0 and m["linear_init_top1"] > 30.0  # chance is 10%
    assert m["linear_pixels_top1"] > 50.0
    assert "raw pixels" in captured.err and "linear top-1" in captured.err


def test_evaluate_command_rejects_probe_options_without_linear(saved_checkpoint, capsys):
    from pipeline.cli import main

    assert main(["evaluate", saved_checkpoint[0], "--avgpool"]) == 2
    assert "add --linear" in capsys.readouterr().err
