"""``model.init_from``: a tiny timm ViT saved as safetensors stands for released weights.

After ``resolve_init`` (the driver) and ``apply_init`` (what a worker does with the bytes) the
backbone holds exactly those weights, its position embeddings resampled as timm resamples them;
a missing key, another patch size or width and an unreadable source are one-line errors naming
what is wrong; a dino-ray checkpoint gives its teacher backbone; the head warm-up drops the
backbone's gradients only. Nothing is downloaded."""

from __future__ import annotations

import pytest
import timm
import torch
from presets import tiny_config
from safetensors.torch import load, save_file
from timm.layers import resample_abs_pos_embed

from dino_model.init_weights import apply_init, cancel_backbone_gradients
from pipeline.checkpoints import build_models, load_teacher_backbone, save_checkpoint
from pipeline.config import ConfigError, DinoConfig
from pipeline.registry.init_from import InitSourceError, resolve_init

# the TINY preset's backbone: test_vit, patch 4, 32 px globals -> an 8 x 8 grid


def _released(path, *, img_size=32, patch_size=4, num_classes=0, **kwargs):
    """A 'released' test_vit checkpoint, random weights, written as safetensors."""
    torch.manual_seed(7)
    model = timm.create_model(
        "test_vit", img_size=img_size, patch_size=patch_size, num_classes=num_classes, **kwargs
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def _cfg(tmp_path, init_from, **updates):
    return tiny_config(
        "demo", tmp_path / "runs", "init", model__init_from=str(init_from), **updates
    )


def _fresh_backbone(cfg):
    student, _ = build_models(cfg, seed=cfg.train.seed)
    return student.backbone


def _error(cfg) -> str:
    with pytest.raises(InitSourceError) as info:
        resolve_init(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("model.init_from ")
    return message


def test_backbone_equals_released_weights(tmp_path):
    released = _released(tmp_path / "w.safetensors")
    cfg = _cfg(tmp_path, tmp_path / "w.safetensors")
    init = resolve_init(cfg)
    backbone = _fresh_backbone(cfg)
    assert any(not torch.equal(backbone.state_dict()[k], v) for k, v in released.items())
    apply_init(backbone, load(init.to_bytes()))  # what a worker does with the driver's bytes
    got = backbone.state_dict()
    assert got.keys() == released.keys()
    for key, value in released.items():
        assert torch.equal(got[key], value), key
    assert init.report.dropped == () and init.report.resampled == {}


def test_position_embeddings_resampled_and_classifier_dropped(tmp_path):
    # released at 64 px (a 16 x 16 grid) with a 10-class classifier
    released = _released(tmp_path / "w.safetensors", img_size=64, num_classes=10)
    cfg = _cfg(tmp_path, tmp_path / "w.safetensors")
    backbone = _fresh_backbone(cfg)
    init = resolve_init(cfg)
    apply_init(backbone, init.state)
    report = init.report
    got = backbone.state_dict()
    want = resample_abs_pos_embed(released["pos_embed"], new_size=[8, 8], num_prefix_tokens=1)
    assert got["pos_embed"].shape == (1, 1 + 64, released["pos_embed"].shape[-1])
    torch.testing.assert_close(got["pos_embed"], want, rtol=0, atol=1e-6)
    for key in got.keys() - {"pos_embed"}:
        assert torch.equal(got[key], released[key]), key
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert report.resampled == {"pos_embed": ((16, 16), (8, 8))}


def test_missing_key_is_named(tmp_path):
    state = _released(tmp_path / "w.safetensors")
    del state["blocks.1.norm1.weight"]
    save_file(state, str(tmp_path / "w.safetensors"))
    message = _error(_cfg(tmp_path, tmp_path / "w.safetensors"))
    assert "missing blocks.1.norm1.weight" in message and "model.arch" in message


def test_wrong_patch_size_is_named(tmp_path):
    _released(tmp_path / "w.safetensors", patch_size=8)
    message = _error(_cfg(tmp_path, tmp_path / "w.safetensors"))
    assert "patch size 8" in message and "model.patch_size=8" in message


def test_wrong_width_is_named(tmp_path):
    _released(tmp_path / "w.safetensors", embed_dim=32)  # test_vit is 64 wide
    message = _error(_cfg(tmp_path, tmp_path / "w.safetensors"))
    assert "32 wide" in message and "the backbone 64" in message


@pytest.mark.parametrize("kind", ["absent file", "not safetensors", "no checkpoint"])
def test_unreadable_source(tmp_path, kind):
    source = {
        "absent file": tmp_path / "absent.safetensors",
        "not safetensors": tmp_path / "text.safetensors",
        "no checkpoint": tmp_path / "empty_dir",
    }[kind]
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    (tmp_path / "empty_dir").mkdir()
    assert "cannot read it" in _error(_cfg(tmp_path, source))


def _checkpoint(tmp_path):
    """A dino-ray checkpoint whose teacher differs from the student and from a random init."""
    cfg = tiny_config("demo", tmp_path / "runs", "source", train__seed=3)
    student, teacher = build_models(cfg, seed=3)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rdir = tmp_path / "runs" / "source"
    return rdir, save_checkpoint(
        rdir / "checkpoint_000006",
        student=student,
        teacher=teacher,
        center=torch.zeros(1, cfg.model.out_dim),
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        epoch=2,
        global_step=6,
        iters_per_epoch=3,
        cfg=cfg,
    )


@pytest.mark.parametrize("which", ["checkpoint", "run directory"])
def test_checkpoint_gives_its_teacher_backbone(tmp_path, which):
    rdir, ckpt = _checkpoint(tmp_path)
    want, _ = load_teacher_backbone(ckpt)
    init = resolve_init(_cfg(tmp_path, ckpt if which == "checkpoint" else rdir))
    for key, value in want.state_dict().items():
        assert torch.equal(init.state[key], value), key


def test_head_warmup_updates_the_head_only(tmp_path):
    cfg = tiny_config("demo", tmp_path / "runs", "warm")
    student, _ = build_models(cfg, seed=0)
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    student(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
    cancel_backbone_gradients(student)
    optimizer.step()
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed)
    assert any(k.startswith("head.mlp") for k in changed)


def test_config_fields():
    with pytest.raises(ConfigError, match="needs model.init_from"):
        DinoConfig.load(None, ["optim.freeze_backbone_epochs=1"])
    with pytest.raises(ConfigError, match="below train.epochs"):
        DinoConfig.load(
            None,
            ["optim.freeze_backbone_epochs=5", "train.epochs=5", "model.init_from=w.safetensors"],
        )
    for bad in ("timm:", "models:/name", "models:/name/latest", "hf-hub:org/name"):
        with pytest.raises(ConfigError, match="model.init_from"):
            DinoConfig.load(None, [f"model.init_from={bad}"])
    for good in (
        "timm:vit_small_patch14_dinov2.lvd142m",
        "models:/dino-teacher@champion",
        "models:/dino-teacher/3",
        "s3://bucket/weights.safetensors",
        "runs/dino/checkpoint_000010",
    ):
        assert DinoConfig.load(None, [f"model.init_from={good}"]).model.init_from == good
