"""The DINOv2 training step, re-created from the paper (Oquab et al. 2023, sec. 4: image-level
DINO loss, patch-level iBOT loss on masked patches, untied or shared heads, Sinkhorn-Knopp
centring, KoLeo, layer-wise decay) and written statement for statement after the official code
(facebookresearch/dinov2: ``train/ssl_meta_arch.py`` ``SSLMetaArch.forward_backward``,
``loss/dino_clstoken_loss.py``, ``loss/ibot_patch_loss.py``, ``loss/koleo_loss.py``,
``models/vision_transformer.py`` ``prepare_tokens_with_masks``, ``data/collate.py``,
``utils/param_groups.py``, ``train/train.py`` ``apply_optim_scheduler`` and the loop body).

The one reference for ``bench/step.py --recipe dinov2`` (speed) and
``tests/test_model_dinov2_step.py`` (numerics). One rank; the student is a ``ModuleDict`` of
``backbone`` (the ViT and its mask token), ``dino_head`` and ``ibot_head`` as DINOv2 holds it
(each part clipped on its own); the ViT and head modules are the caller's, so both
implementations run the same network. The ViT is timm's (with ``reg_tokens`` its register tokens
sit after the CLS token and timm's position embedding covers them): ``prepare_tokens_with_masks``
below follows that layout.

One departure, asked for by the project: no weight decay on the tokens (CLS, position, mask,
register), which DINOv2 decays (see ``dino_model.param_groups``). Marked ``# project:`` below.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed


class DINOLoss(nn.Module):
    """dinov2/loss/dino_clstoken_loss.py."""

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_output = None
        self.async_batch_center = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        teacher_output = teacher_output.float()
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        Q = torch.exp(teacher_output / teacher_temp).t()  # K-by-B
        B = Q.shape[1] * world_size  # number of samples to assign
        K = Q.shape[0]  # how many prototypes
        sum_Q = torch.sum(Q)  # make the matrix sum to 1
        if dist.is_initialized():
            dist.all_reduce(sum_Q)
        Q /= sum_Q
        for _ in range(n_iterations):
            # normalize each row: total weight per prototype must be 1/K
            sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
            if dist.is_initialized():
                dist.all_reduce(sum_of_rows)
            Q /= sum_of_rows
            Q /= K
            # normalize each column: total weight per sample must be 1/B
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B  # the columns must sum to 1 so that Q is an assignment
        return Q.t()

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        total_loss = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                loss = torch.sum(t * lsm, dim=-1)
                total_loss -= loss.mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output):
        self.updated = False
        self.len_teacher_output = len(teacher_output)
        self.async_batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        if dist.is_initialized():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            _t = self.async_batch_center / (self.len_teacher_output * world_size)
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


def lossfunc(t, s, temp):
    return torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)


class iBOTPatchLoss(nn.Module):  # noqa: N801 (the official name)
    """dinov2/loss/ibot_patch_loss.py."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_patch_tokens = None
        self.async_batch_center = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3
    ):
        teacher_output = teacher_output.float()
        Q = torch.exp(teacher_output / teacher_temp).t()
        B = n_masked_patches_tensor
        if dist.is_initialized():
            dist.all_reduce(B)
        K = Q.shape[0]  # how many prototypes
        sum_Q = torch.sum(Q)
        if dist.is_initialized():
            dist.all_reduce(sum_Q)
        Q /= sum_Q
        for _ in range(n_iterations):
            sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
            if dist.is_initialized():
                dist.all_reduce(sum_of_rows)
            Q /= sum_of_rows
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()

    def forward_masked(
        self,
        student_patch_tokens_masked,
        teacher_patch_tokens_masked,
        student_masks_flat,
        n_masked_patches=None,
        masks_weight=None,
    ):
        t = teacher_patch_tokens_masked
        s = student_patch_tokens_masked
        loss = lossfunc(t, s, self.student_temp)
        if masks_weight is None:
            masks_weight = (
                (1 / student_masks_flat.sum(-1).clamp(min=1.0))
                .unsqueeze(-1)
                .expand_as(student_masks_flat)[student_masks_flat]
            )
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens):
        self.updated = False
        self.len_teacher_patch_tokens = len(teacher_patch_tokens)
        self.async_batch_center = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)
        if dist.is_initialized():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            _t = self.async_batch_center / (self.len_teacher_patch_tokens * world_size)
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


class KoLeoLoss(nn.Module):
    """dinov2/loss/koleo_loss.py (Sablayrolles et al. 2018)."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):  # noqa: N802 (the official name)
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # trick to fill the diagonal with -1
        _, I = torch.max(dots, dim=1)  # noqa: E741
        return I

    def forward(self, student_output, eps=1e-8):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        I = self.pairwise_NNs_inner(student_output)  # noqa: E741
        distances = self.pdist(student_output, student_output[I])  # BxD, BxD -> B
        return -torch.log(distances + eps).mean()


class Backbone(nn.Module):
    """The DINOv2 backbone's ``forward_features`` over a timm ViT, with the mask token."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))

    def prepare_tokens_with_masks(self, x, masks=None):
        vit = self.vit
        x = vit.patch_embed(x)  # (B, h, w, D): timm's dynamic-size patch embedding
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        prefix = [vit.cls_token.expand(B, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        pos_embed = vit.pos_embed
        if (h, w) != tuple(vit.patch_embed.grid_size):  # DINOv2's interpolate_pos_encoding, as
            # the network does it (timm's resampling): the local crops' smaller grid
            pos_embed = resample_abs_pos_embed(
                pos_embed, new_size=(h, w), num_prefix_tokens=vit.num_prefix_tokens
            )
        return x + pos_embed

    def forward_features(self, x, masks=None):
        if isinstance(x, list):
            return [self.forward_features(x_, m_) for x_, m_ in zip(x, masks)]
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.vit.blocks:
            x = blk(x)
        x_norm = self.vit.norm(x)
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_patchtokens": x_norm[:, self.vit.num_prefix_tokens :],
            "masks": masks,
        }


class Batch(NamedTuple):
    """What ``collate_data_and_cast`` hands the model."""

    collated_global_crops: torch.Tensor
    collated_local_crops: torch.Tensor
    collated_masks: torch.Tensor
    mask_indices_list: torch.Tensor
    masks_weight: torch.Tensor
    upperbound: int
    n_masked_patches: torch.Tensor


def collate(global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor, pad=0):
    """The mask tensors of ``collate_data_and_cast`` for given (2B, N) masks; ``pad`` rows of
    buffer past the masked patches (DINOv2's ``upperbound`` exceeds the count)."""
    collated_masks = masks
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (
        (1 / collated_masks.sum(-1).clamp(min=1.0))
        .unsqueeze(-1)
        .expand_as(collated_masks)[collated_masks]
    )
    return Batch(
        global_crops,
        local_crops,
        collated_masks,
        mask_indices_list,
        masks_weight,
        int(mask_indices_list.shape[0]) + pad,
        torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    )


class SSLMetaArch(nn.Module):
    """The parts of ``SSLMetaArch`` a step runs. ``float_losses``: the losses in float32 (the
    networks around them may run in float64, see ``tests/test_model_dinov2_step.py``)."""

    def __init__(
        self,
        student: nn.ModuleDict,
        teacher: nn.ModuleDict,
        *,
        out_dim: int,
        patch_out_dim: int,
        centering: str,
        ibot_separate_head: bool,
        dino_loss_weight: float = 1.0,
        ibot_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.centering = centering
        self.ibot_separate_head = ibot_separate_head
        self.dino_loss_weight = dino_loss_weight
        self.ibot_loss_weight = ibot_loss_weight
        self.koleo_loss_weight = koleo_loss_weight
        self.dino_loss = DINOLoss(out_dim, student_temp, center_momentum)
        self.ibot_patch_loss = iBOTPatchLoss(patch_out_dim, student_temp, center_momentum)
        self.koleo_loss = KoLeoLoss()

    def forward_backward(self, images: Batch, teacher_temp: float, n_local_crops: int):
        n_global_crops = 2
        global_crops = images.collated_global_crops
        local_crops = images.collated_local_crops
        masks = images.collated_masks
        mask_indices_list = images.mask_indices_list
        n_masked_patches_tensor = images.n_masked_patches
        n_masked_patches = mask_indices_list.shape[0]
        upperbound = images.upperbound
        masks_weight = images.masks_weight
        n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 0)
        n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops

        @torch.no_grad()
        def get_teacher_output():
            x, n_global_crops_teacher = global_crops, n_global_crops
            teacher_backbone_output_dict = self.teacher.backbone.forward_features(x)
            teacher_cls_tokens = teacher_backbone_output_dict["x_norm_clstoken"]
            teacher_cls_tokens = teacher_cls_tokens.chunk(n_global_crops_teacher)
            # chunked and cat'd in reverse so A is matched to B in the global crops dino loss
            teacher_cls_tokens = torch.cat((teacher_cls_tokens[1], teacher_cls_tokens[0]))
            ibot_teacher_patch_tokens = teacher_backbone_output_dict["x_norm_patchtokens"]
            _dim = ibot_teacher_patch_tokens.shape[-1]
            n_cls_tokens = teacher_cls_tokens.shape[0]
            if not self.ibot_separate_head:
                buffer_tensor_teacher = ibot_teacher_patch_tokens.new_zeros(
                    upperbound + n_cls_tokens, _dim
                )
                buffer_tensor_teacher[:n_cls_tokens].copy_(teacher_cls_tokens)
                torch.index_select(
                    ibot_teacher_patch_tokens.flatten(0, 1),
                    dim=0,
                    index=mask_indices_list,
                    out=buffer_tensor_teacher[n_cls_tokens : n_cls_tokens + n_masked_patches],
                )
                tokens_after_head = self.teacher.dino_head(buffer_tensor_teacher).float()
                teacher_cls_tokens_after_head = tokens_after_head[:n_cls_tokens]
                masked_teacher_patch_tokens_after_head = tokens_after_head[
                    n_cls_tokens : n_cls_tokens + n_masked_patches
                ]
            else:
                buffer_tensor_teacher = ibot_teacher_patch_tokens.new_zeros(upperbound, _dim)
                torch.index_select(
                    ibot_teacher_patch_tokens.flatten(0, 1),
                    dim=0,
                    index=mask_indices_list,
                    out=buffer_tensor_teacher[:n_masked_patches],
                )
                teacher_cls_tokens_after_head = self.teacher.dino_head(teacher_cls_tokens).float()
                masked_teacher_patch_tokens_after_head = self.teacher.ibot_head(
                    buffer_tensor_teacher
                ).float()[:n_masked_patches]

            if self.centering == "centering":
                teacher_dino_softmaxed_centered_list = self.dino_loss.softmax_center_teacher(
                    teacher_cls_tokens_after_head, teacher_temp=teacher_temp
                ).view(n_global_crops_teacher, -1, *teacher_cls_tokens_after_head.shape[1:])
                self.dino_loss.update_center(teacher_cls_tokens_after_head)
                masked_teacher_patch_tokens_after_head = (
                    masked_teacher_patch_tokens_after_head.unsqueeze(0)
                )
                masked_teacher_ibot_softmaxed_centered = (
                    self.ibot_patch_loss.softmax_center_teacher(
                        masked_teacher_patch_tokens_after_head[:, :n_masked_patches],
                        teacher_temp=teacher_temp,
                    )
                )
                masked_teacher_ibot_softmaxed_centered = (
                    masked_teacher_ibot_softmaxed_centered.squeeze(0)
                )
                self.ibot_patch_loss.update_center(
                    masked_teacher_patch_tokens_after_head[:n_masked_patches]
                )
            elif self.centering == "sinkhorn_knopp":
                teacher_dino_softmaxed_centered_list = self.dino_loss.sinkhorn_knopp_teacher(
                    teacher_cls_tokens_after_head, teacher_temp=teacher_temp
                ).view(n_global_crops_teacher, -1, *teacher_cls_tokens_after_head.shape[1:])
                masked_teacher_ibot_softmaxed_centered = (
                    self.ibot_patch_loss.sinkhorn_knopp_teacher(
                        masked_teacher_patch_tokens_after_head,
                        teacher_temp=teacher_temp,
                        n_masked_patches_tensor=n_masked_patches_tensor,
                    )
                )
            else:
                raise NotImplementedError(self.centering)
            return teacher_dino_softmaxed_centered_list, masked_teacher_ibot_softmaxed_centered

        teacher_dino_softmaxed_centered_list, masked_teacher_ibot_softmaxed_centered = (
            get_teacher_output()
        )
        loss_dict = {}
        loss_accumulator = 0
        student_global_backbone_output_dict, student_local_backbone_output_dict = (
            self.student.backbone.forward_features([global_crops, local_crops], masks=[masks, None])
        )
        student_local_cls_tokens = student_local_backbone_output_dict["x_norm_clstoken"]
        student_global_cls_tokens = student_global_backbone_output_dict["x_norm_clstoken"]
        inputs_for_student_head_list = [student_local_cls_tokens, student_global_cls_tokens]
        _dim = student_global_cls_tokens.shape[-1]
        ibot_student_patch_tokens = student_global_backbone_output_dict["x_norm_patchtokens"]
        buffer_tensor_patch_tokens = ibot_student_patch_tokens.new_zeros(upperbound, _dim)
        buffer_tensor_patch_tokens[:n_masked_patches].copy_(
            torch.index_select(
                ibot_student_patch_tokens.flatten(0, 1), dim=0, index=mask_indices_list
            )
        )
        if not self.ibot_separate_head:
            inputs_for_student_head_list.append(buffer_tensor_patch_tokens)
        else:
            student_global_masked_patch_tokens_after_head = self.student.ibot_head(
                buffer_tensor_patch_tokens
            ).float()[:n_masked_patches]
        # xformers' BlockDiagonalMask.from_tensor_list / split: one head pass, then the parts
        sizes = [t.shape[0] for t in inputs_for_student_head_list]
        outputs_list = list(
            self.student.dino_head(torch.cat(inputs_for_student_head_list)).float().split(sizes)
        )
        student_local_cls_tokens_after_head = outputs_list.pop(0)
        student_global_cls_tokens_after_head = outputs_list.pop(0)
        if not self.ibot_separate_head:
            student_global_masked_patch_tokens_after_head = outputs_list.pop(0)[:n_masked_patches]

        if n_local_crops > 0:
            dino_local_crops_loss = self.dino_loss(
                student_output_list=student_local_cls_tokens_after_head.chunk(n_local_crops),
                teacher_out_softmaxed_centered_list=teacher_dino_softmaxed_centered_list,
            ) / (n_global_crops_loss_terms + n_local_crops_loss_terms)
            loss_dict["dino_local_crops_loss"] = dino_local_crops_loss
            loss_accumulator += self.dino_loss_weight * dino_local_crops_loss
        loss_scales = 2  # this is here since we process global crops together
        dino_global_crops_loss = (
            self.dino_loss(
                student_output_list=[student_global_cls_tokens_after_head],
                teacher_out_softmaxed_centered_list=[
                    teacher_dino_softmaxed_centered_list.flatten(0, 1)
                ],
            )
            * loss_scales
            / (n_global_crops_loss_terms + n_local_crops_loss_terms)
        )
        loss_dict["dino_global_crops_loss"] = dino_global_crops_loss
        loss_accumulator += self.dino_loss_weight * dino_global_crops_loss
        student_cls_tokens = student_global_cls_tokens.float()
        koleo_loss = self.koleo_loss_weight * sum(
            self.koleo_loss(p) for p in student_cls_tokens.chunk(2)
        )
        loss_accumulator += koleo_loss
        loss_dict["koleo_loss"] = koleo_loss / self.koleo_loss_weight
        ibot_patch_loss = self.ibot_patch_loss.forward_masked(
            student_global_masked_patch_tokens_after_head,
            masked_teacher_ibot_softmaxed_centered,
            student_masks_flat=masks,
            n_masked_patches=n_masked_patches,
            masks_weight=masks_weight,
        )
        loss_dict["ibot_loss"] = ibot_patch_loss
        loss_accumulator += self.ibot_loss_weight * ibot_patch_loss
        loss_accumulator.backward()
        loss_dict["total"] = loss_accumulator.detach()
        return loss_dict

    @torch.no_grad()
    def update_teacher(self, m):
        for k in self.student.keys():
            student_param_list = list(self.student[k].parameters())
            teacher_param_list = list(self.teacher[k].parameters())
            torch._foreach_mul_(teacher_param_list, m)
            torch._foreach_add_(teacher_param_list, student_param_list, alpha=1 - m)


def get_vit_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, force_is_backbone=False):
    """dinov2/utils/param_groups.py (without its chunked-blocks branch)."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if (
            ".pos_embed" in name
            or ".patch_embed" in name
            or ".mask_token" in name
            or ".cls_token" in name
            or ".register_tokens" in name
        ):
            layer_id = 0
        elif force_is_backbone and (
            "pos_embed" in name
            or "patch_embed" in name
            or "mask_token" in name
            or "cls_token" in name
            or "register_tokens" in name
            or "reg_token" in name  # project: timm's name of the register tokens
        ):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    n_blocks = len(model.vit.blocks) if hasattr(model, "vit") else 0
    all_param_groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay_rate = get_vit_lr_decay_rate(
            name, lr_decay_rate, num_layers=n_blocks, force_is_backbone=n_blocks > 0
        )
        d = {
            "params": param,
            "is_last_layer": False,
            "lr_multiplier": decay_rate,
            "wd_multiplier": 1.0,
            "name": name,
        }
        if "last_layer" in name:
            d.update({"is_last_layer": True})
        if name.endswith(".bias") or "norm" in name or "gamma" in name:
            d.update({"wd_multiplier": 0.0})
        # project: no decay on 1-D weights and on the tokens either
        if param.ndim <= 1 or name.rsplit(".", 1)[-1] in (
            "cls_token",
            "pos_embed",
            "reg_token",
            "mask_token",
        ):
            d.update({"wd_multiplier": 0.0})
        if "patch_embed" in name:
            d.update({"lr_multiplier": d["lr_multiplier"] * patch_embed_lr_mult})
        all_param_groups.append(d)
    return all_param_groups


def fuse_params_groups(all_params_groups, keys=("lr_multiplier", "wd_multiplier", "is_last_layer")):
    fused_params_groups = defaultdict(lambda: {"params": []})
    for d in all_params_groups:
        identifier = ""
        for k in keys:
            identifier += k + str(d[k]) + "_"
        for k in keys:
            fused_params_groups[identifier][k] = d[k]
        fused_params_groups[identifier]["params"].append(d["params"])
    return fused_params_groups.values()


def build_optimizer(student: nn.ModuleDict, layerwise_decay, patch_embed_lr_mult):
    """SSLMetaArch.get_params_groups + train.build_optimizer: AdamW, betas (0.9, 0.999)."""
    all_params_groups = []
    for m in student.values():
        all_params_groups += list(
            fuse_params_groups(
                get_params_groups_with_decay(
                    m, lr_decay_rate=layerwise_decay, patch_embed_lr_mult=patch_embed_lr_mult
                )
            )
        )
    return torch.optim.AdamW(all_params_groups, betas=(0.9, 0.999))


def apply_optim_scheduler(optimizer, lr, wd, last_layer_lr):
    for param_group in optimizer.param_groups:
        is_last_layer = param_group["is_last_layer"]
        lr_multiplier = param_group["lr_multiplier"]
        wd_multiplier = param_group["wd_multiplier"]
        param_group["weight_decay"] = wd * wd_multiplier
        param_group["lr"] = (last_layer_lr if is_last_layer else lr) * lr_multiplier


def clip_grad_norm(module: nn.Module, max_norm: float) -> float:
    """FSDP's ``clip_grad_norm_`` on one part, single rank: torch's; returns the total norm."""
    return float(torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm))


def train_step(
    model: SSLMetaArch,
    optimizer,
    data: Batch,
    *,
    lr: float,
    wd: float,
    mom: float,
    teacher_temp: float,
    last_layer_lr: float,
    n_local_crops: int,
    clip_grad: float = 3.0,
) -> tuple[dict, list[float]]:
    """The body of the loop of ``train.do_train`` (no fp16 scaler); returns the loss dict and the
    parts' gradient norms before clipping."""
    apply_optim_scheduler(optimizer, lr, wd, last_layer_lr)
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(data, teacher_temp=teacher_temp, n_local_crops=n_local_crops)
    norms = []
    if clip_grad:
        for v in model.student.values():
            norms.append(clip_grad_norm(v, clip_grad))
    optimizer.step()
    model.update_teacher(mom)
    return loss_dict, norms
