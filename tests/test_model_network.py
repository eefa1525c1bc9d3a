"""Backbone factory, DINO head and the multi-crop forward."""

import pytest
import torch

from dino_model.backbone import build_backbone
from dino_model.head import DINOHead
from dino_model.model import build_student_teacher
from dino_model.multicrop import MultiCropWrapper, resolution_groups


def test_vit_small_image_settings_accept_several_resolutions():
    vit = build_backbone("vit_tiny", img_size=32, patch_size=4)
    assert vit.embed_dim == 192
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    assert vit(torch.randn(3, 3, 16, 16)).shape == (3, 192)


@pytest.mark.parametrize("name,patch", [("vit_small", 16), ("vit_small", 8), ("vit_base", 16)])
def test_named_vits_build_with_their_patch(name, patch):
    vit = build_backbone(name, img_size=224, patch_size=patch)
    assert vit.patch_embed.patch_size == (patch, patch)


def test_cnn_returns_pooled_embedding_and_timm_names_pass_through():
    assert build_backbone("resnet50").embed_dim == 2048
    cnn = build_backbone("resnet18")
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="model.arch"):
        build_backbone("no_such_net")


def test_head_shapes_weight_norm_and_frozen_norm():
    head = DINOHead(192, 100, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(5, 192)).detach()
    assert out.shape == (5, 100)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    # with g = 1 the prototypes are unit vectors, so |logit| <= 1 (cosine similarity)
    assert float(out.abs().max()) <= 1.0 + 1e-5
    assert head.last_layer.bias is None
    assert DINOHead(
        8, 4, norm_last_layer=False
    ).last_layer.parametrizations.weight.original0.requires_grad
    bn = DINOHead(8, 4, hidden_dim=16, use_bn=True)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules())


def test_resolution_groups():
    crops = (
        [torch.zeros(1, 3, 8, 8)] * 2 + [torch.zeros(1, 3, 4, 4)] * 3 + [torch.zeros(1, 3, 8, 8)]
    )
    assert resolution_groups(crops) == [(0, 2), (2, 5), (5, 6)]


def test_multicrop_forward_equals_separate_forwards():
    torch.manual_seed(0)
    student, _ = build_student_teacher(
        "vit_tiny",
        img_size=32,
        patch_size=4,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        drop_path_rate=0.0,
    )
    student.eval()
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [
        torch.randn(3, 3, 16, 16) for _ in range(4)
    ]
    batched = student(crops)
    separate = torch.cat([student.head(student.backbone(c)) for c in crops])
    assert batched.shape == (18, 64)
    assert torch.allclose(batched, separate, atol=1e-5)


def test_teacher_starts_equal_and_is_frozen():
    student, teacher = build_student_teacher(
        "vit_tiny", img_size=32, patch_size=4, out_dim=32, hidden_dim=16, bottleneck_dim=8
    )
    assert all(not p.requires_grad for p in teacher.parameters())
    for (n1, p1), (n2, p2) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert isinstance(student, MultiCropWrapper)


def test_timm_test_vit_takes_the_patch_size():
    vit = build_backbone("test_vit", img_size=32, patch_size=4)
    assert vit.patch_embed.patch_size == (4, 4)
    assert vit(torch.randn(1, 3, 16, 16)).shape == (1, vit.embed_dim)


def test_cifar_stem_keeps_resolution_and_rebuilds_from_the_registry_description():
    """A ResNet with ``cifar_stem`` sees 32 px at full resolution in its first block (the
    ImageNet stem divides it by 4); a ViT refuses the option; the registry rebuilds it."""
    from pipeline.config import DinoConfig
    from pipeline.preflight import PreflightError, check_config
    from pipeline.registry.arch import build_verified, parse_arch
    from pipeline.registry.register import arch_description

    seen = {}
    net = build_backbone("test_resnet", cifar_stem=True)
    net.layer1.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, net.embed_dim)
    assert seen["shape"][-2:] == (32, 32)
    plain = build_backbone("test_resnet")
    plain.layer1.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    plain(torch.randn(2, 3, 32, 32))
    assert seen["shape"][-2:] == (8, 8)
    with pytest.raises(PreflightError, match="model.cifar_stem"):
        check_config(
            DinoConfig().with_overrides({"model.arch": "test_vit", "model.cifar_stem": True})
        )
    cfg = DinoConfig().with_overrides(
        {
            "model.arch": "test_resnet",
            "model.cifar_stem": True,
            "augment.global_size": 32,
            "augment.local_size": 16,
        }
    )
    spec = parse_arch(arch_description(cfg, net.embed_dim) | {"format": _format()})
    from safetensors.torch import save

    rebuilt = build_verified(spec, save(net.state_dict()))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt(x), net.eval()(x))


def _format() -> str:
    from pipeline.registry.package import FORMAT

    return FORMAT
