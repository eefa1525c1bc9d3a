"""One DINO training step: ours (``dino_model.step.dino_step``) against the official DINO
``train_one_epoch`` step (re-created in ``tests/official_dino.py``), on the same network, batch,
crops and precision.

Both sides start from the same student, teacher and centre and take the same batch at every
step; each keeps its own optimiser, schedules and step counter. Ours is built by
``build_student_teacher`` (the last ViT block computes the CLS token alone,
``dino_model.cls_block``); the official's last block computes every token, as its code does.
After one warm-up step each (optimiser state, allocator), rounds alternate between the two
(A/B/A/B...) so that machine load affects both alike; a round is ``--steps`` steps, timed from
start to a device sync at its end, and ours reads its metrics once per round, as the training
loop reads them every N steps. Each side's step time is the median over rounds of round time /
steps.

Defaults: ViT-tiny/16 (timm ``vit_tiny_patch16_224``), 2 x 224 + 8 x 96 crops, batch 32,
K = 65536 and the official head, fp32, on CPU, past the frozen epoch. On CUDA: ViT-S/16, batch 64,
ours in bf16 against the official fp16 with its GradScaler (``--official-precision`` to change).

``--recipe dinov2``: ``dino_model.dinov2_step.dinov2_step`` (DINO + iBOT + KoLeo, Sinkhorn-Knopp,
shared head, layer decay 0.9, patch-embedding lr x 0.2, ``--registers`` register tokens) against
the DINOv2 step re-created in ``tests/official_dinov2.py``, both with the same block masks of the
global crops (DINOv2's settings: half the views masked, ratios in [0.1, 0.5]); the official pads
its masked-patch buffers to DINOv2's ``upperbound``, as its collate does. fp32 only.

    python bench/step.py [--recipe dino|dinov2] [--device cpu] [--arch vit_tiny] [--batch 32]
                         [--rounds 5] [--steps 3] [--precision fp32|bf16]
                         [--official-precision fp32|bf16|fp16] [--epoch 1] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and the tests' references
import official_dino as official  # noqa: E402
import official_dinov2  # noqa: E402

from bench._corpus import command_line, machine  # noqa: E402
from dino_model.dinov2_step import dinov2_step  # noqa: E402
from dino_model.ibot_loss import IBOTPatchLoss  # noqa: E402
from dino_model.loss import DINOLoss  # noqa: E402
from dino_model.mask_batch import MaskBatch  # noqa: E402
from dino_model.masking import BlockMasking  # noqa: E402
from dino_model.model import build_student_teacher  # noqa: E402
from dino_model.optim import build_optimizer  # noqa: E402
from dino_model.param_groups import dinov2_param_groups  # noqa: E402
from dino_model.precision import resolve_precision  # noqa: E402
from dino_model.schedules import build_schedules, scaled_lr  # noqa: E402
from dino_model.step import dino_step  # noqa: E402

# the official ViT-S/16 recipe (main_dino.py defaults = dino_ray's config defaults)
LR, MIN_LR, WARMUP_EPOCHS, WD, WD_END = 5e-4, 1e-6, 10, 0.04, 0.4
MOMENTUM, MOMENTUM_END, TEACHER_TEMP, CLIP, FREEZE_EPOCHS = 0.996, 1.0, 0.04, 3.0, 1
EPOCHS, IPE = 100, 1000  # schedule length; the steps timed are the first ones of ``--epoch``
# DINOv2's ViT-S/B defaults (dinov2/configs/ssl_default_config.yaml)
LAYER_DECAY, PATCH_EMBED_LR_MULT, IBOT_WEIGHT, KOLEO_WEIGHT = 0.9, 0.2, 1.0, 0.1
MASK_PROBABILITY, MASK_RATIO = 0.5, (0.1, 0.5)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=["dino", "dinov2"], default="dino")
    ap.add_argument("--registers", type=int, default=4, help="dinov2: register tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", help="vit_tiny on CPU, vit_small on CUDA")
    ap.add_argument("--batch", type=int, help="32 on CPU, 64 on CUDA")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--hidden-dim", type=int, default=2048)
    ap.add_argument("--bottleneck-dim", type=int, default=256)
    ap.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="ours: fp32 on CPU, bf16 on CUDA"
    )
    ap.add_argument(
        "--official-precision",
        choices=["fp32", "bf16", "fp16"],
        help="the official: as ours on CPU, fp16 (+ GradScaler) on CUDA",
    )
    ap.add_argument("--epoch", type=int, default=1, help="0: the frozen last layer's epoch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--compile", action="store_true", help="torch.compile our networks (opt-in)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.arch = args.arch or ("vit_small" if cuda else "vit_tiny")
    args.batch = args.batch or (64 if cuda else 32)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.official_precision = args.official_precision or ("fp16" if cuda else args.precision)
    return args


def make_crops(args, device: torch.device) -> list[torch.Tensor]:
    """Normalised crops (the training loop normalises on the device): globals, then locals."""
    g = torch.Generator().manual_seed(args.seed)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    return [torch.randn(args.batch, 3, s, s, generator=g).to(device) for s in sizes]


class Ours:
    def __init__(self, student, teacher, args, device) -> None:
        self.student, self.teacher = student, teacher
        if args.compile:
            from dino_model.compile import compile_networks

            compile_networks(student, teacher)
        self.loss_fn = DINOLoss(args.out_dim).to(device)
        self.optimizer = build_optimizer(student)
        self.autocast, self.scaler = resolve_precision(args.precision, device)
        self.sched = build_schedules(
            lr=scaled_lr(LR, args.batch),
            min_lr=MIN_LR,
            warmup_epochs=WARMUP_EPOCHS,
            weight_decay=WD,
            weight_decay_end=WD_END,
            momentum_teacher=MOMENTUM,
            momentum_teacher_end=MOMENTUM_END,
            warmup_teacher_temp=TEACHER_TEMP,
            teacher_temp=TEACHER_TEMP,
            warmup_teacher_temp_epochs=0,
            freeze_last_layer_epochs=FREEZE_EPOCHS,
            epochs=EPOCHS,
            iters_per_epoch=IPE,
        )
        self.it = args.epoch * IPE
        self.last = None

    def step(self, crops) -> None:
        self.last = dino_step(
            student=self.student,
            teacher=self.teacher,
            loss_fn=self.loss_fn,
            optimizer=self.optimizer,
            crops=crops,
            schedule=self.sched.at(self.it),
            clip_grad=CLIP,
            autocast_dtype=self.autocast,
            scaler=self.scaler,
        )
        self.it += 1

    def read(self) -> dict:
        return self.last.metrics()  # every N steps: the one read of the device


class Official:
    def __init__(self, student, teacher, args, device) -> None:
        self.student = official.MultiCropWrapper(student.backbone, student.head)
        self.teacher = official.MultiCropWrapper(teacher.backbone, teacher.head)
        self.loss_fn = official.DINOLoss(
            args.out_dim, 2 + args.local_crops, TEACHER_TEMP, TEACHER_TEMP, 0, EPOCHS
        ).to(device)
        self.optimizer = official.build_optimizer(self.student)
        self.autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
            args.official_precision
        ]
        self.scaler = (
            torch.amp.GradScaler(device.type) if args.official_precision == "fp16" else None
        )
        self.lr = official.cosine_scheduler(
            scaled_lr(LR, args.batch), MIN_LR, EPOCHS, IPE, warmup_epochs=WARMUP_EPOCHS
        )
        self.wd = official.cosine_scheduler(WD, WD_END, EPOCHS, IPE)
        self.momentum = official.cosine_scheduler(MOMENTUM, MOMENTUM_END, EPOCHS, IPE)
        self.it = args.epoch * IPE
        self.last = None

    def step(self, crops) -> None:
        self.last = official.train_step(
            self.student,
            self.teacher,
            self.loss_fn,
            self.optimizer,
            crops,
            epoch=self.it // IPE,
            it=self.it,
            lr_schedule=self.lr,
            wd_schedule=self.wd,
            momentum_schedule=self.momentum,
            clip_grad=CLIP,
            freeze_last_layer=FREEZE_EPOCHS,
            fp16_scaler=self.scaler,
            autocast_dtype=self.autocast,
        )
        self.it += 1

    def read(self) -> dict:
        return {"loss": self.last.loss}  # read in every step already (``loss.item()``)


def _schedules(args):
    return build_schedules(
        lr=scaled_lr(LR, args.batch),
        min_lr=MIN_LR,
        warmup_epochs=WARMUP_EPOCHS,
        weight_decay=WD,
        weight_decay_end=WD_END,
        momentum_teacher=MOMENTUM,
        momentum_teacher_end=MOMENTUM_END,
        warmup_teacher_temp=TEACHER_TEMP,
        teacher_temp=TEACHER_TEMP,
        warmup_teacher_temp_epochs=0,
        freeze_last_layer_epochs=FREEZE_EPOCHS,
        epochs=EPOCHS,
        iters_per_epoch=IPE,
    )


def make_masks(args) -> torch.Tensor:
    """(2B, N) block masks of the global crops (DINOv2's settings), fixed like the crops."""
    gen = BlockMasking(
        args.global_size // args.patch,
        mask_sample_probability=MASK_PROBABILITY,
        mask_ratio_min_max=MASK_RATIO,
    )
    return torch.as_tensor(gen(np.random.default_rng(args.seed), 2 * args.batch))


class OursV2:
    def __init__(self, student, teacher, args, device, masks) -> None:
        self.student, self.teacher = student, teacher
        self.dino_loss = DINOLoss(args.out_dim, centering="sinkhorn_knopp").to(device)
        self.ibot_loss = IBOTPatchLoss(args.out_dim, centering="sinkhorn_knopp").to(device)
        groups = dinov2_param_groups(
            student, layer_decay=LAYER_DECAY, patch_embed_lr_mult=PATCH_EMBED_LR_MULT
        )
        self.optimizer = build_optimizer(student, groups=groups)
        self.masks = MaskBatch.from_masks(masks).to(device)  # the host work of the loop's collate
        self.sched = _schedules(args)
        self.it = args.epoch * IPE
        self.last = None

    def step(self, crops) -> None:
        self.last = dinov2_step(
            student=self.student,
            teacher=self.teacher,
            dino_loss=self.dino_loss,
            ibot_loss=self.ibot_loss,
            optimizer=self.optimizer,
            crops=crops,
            masks=self.masks,
            schedule=self.sched.at(self.it),
            clip_grad=CLIP,
            ibot_weight=IBOT_WEIGHT,
            koleo_weight=KOLEO_WEIGHT,
        )
        self.it += 1

    def read(self) -> dict:
        return self.last.metrics()


class OfficialV2:
    def __init__(self, student, teacher, args, device, masks) -> None:
        def parts(net):
            return torch.nn.ModuleDict(
                {"backbone": official_dinov2.Backbone(net.backbone), "dino_head": net.head}
            )

        self.model = official_dinov2.SSLMetaArch(
            parts(student),
            parts(teacher),
            out_dim=args.out_dim,
            patch_out_dim=args.out_dim,
            centering="sinkhorn_knopp",
            ibot_separate_head=False,
            ibot_loss_weight=IBOT_WEIGHT,
            koleo_loss_weight=KOLEO_WEIGHT,
        ).to(device)
        self.model.teacher.load_state_dict(self.model.student.state_dict())
        self.optimizer = official_dinov2.build_optimizer(
            self.model.student, LAYER_DECAY, PATCH_EMBED_LR_MULT
        )
        # DINOv2's collate pads the masked-patch buffers to sum_i int(N * probs[i + 1]) over the
        # int(2B * p) masked views, probs = linspace(lo, hi, n + 1)
        n_masked_views = int(masks.shape[0] * MASK_PROBABILITY)
        probs = torch.linspace(*MASK_RATIO, n_masked_views + 1)
        upperbound = sum(int(masks.shape[1] * probs[i + 1]) for i in range(n_masked_views))
        self.masks = masks.to(device)
        self.pad = max(upperbound - int(masks.sum()), 0)
        self.lr = official.cosine_scheduler(
            scaled_lr(LR, args.batch), MIN_LR, EPOCHS, IPE, warmup_epochs=WARMUP_EPOCHS
        )
        self.wd = official.cosine_scheduler(WD, WD_END, EPOCHS, IPE)
        self.momentum = official.cosine_scheduler(MOMENTUM, MOMENTUM_END, EPOCHS, IPE)
        self.n_local = args.local_crops
        self.it = args.epoch * IPE
        self.last = None

    def step(self, crops) -> None:
        batch = official_dinov2.collate(
            torch.cat(crops[:2]), torch.cat(crops[2:]), self.masks, pad=self.pad
        )
        frozen = self.it < FREEZE_EPOCHS * IPE
        self.last, _ = official_dinov2.train_step(
            self.model,
            self.optimizer,
            batch,
            lr=self.lr[self.it],
            wd=self.wd[self.it],
            mom=self.momentum[self.it],
            teacher_temp=TEACHER_TEMP,
            last_layer_lr=0.0 if frozen else self.lr[self.it],
            n_local_crops=self.n_local,
            clip_grad=CLIP,
        )
        self.it += 1

    def read(self) -> dict:
        return {"loss": float(self.last["total"])}  # DINOv2 logs every loss of every step


def timed_round(impl, crops, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps, with the device drained at the end."""
    t0 = time.perf_counter()
    for _ in range(steps):
        impl.step(crops)
    impl.read()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)

    dinov2 = args.recipe == "dinov2"
    if dinov2 and (args.precision != "fp32" or args.official_precision != "fp32"):
        raise SystemExit("--recipe dinov2 is timed in fp32 only (--precision fp32)")

    def build(cls_only_last_block: bool):
        torch.manual_seed(args.seed)  # the same starting weights for both sides
        extra = {"ibot": True, "num_registers": args.registers} if dinov2 else {}
        return build_student_teacher(
            args.arch,
            img_size=args.global_size,
            patch_size=args.patch,
            out_dim=args.out_dim,
            hidden_dim=args.hidden_dim,
            bottleneck_dim=args.bottleneck_dim,
            drop_path_rate=0.1,
            cls_only_last_block=cls_only_last_block,
            **extra,
        )

    student, teacher = build(True)
    # the official ViT computes every token in its last block (``official.MultiCropWrapper``
    # takes the modules)
    official_student, official_teacher = build(False)
    if dinov2:
        masks = make_masks(args)
        impls = {
            "official": OfficialV2(
                official_student.to(device), official_teacher.to(device), args, device, masks
            ),
            "ours": OursV2(student.to(device), teacher.to(device), args, device, masks),
        }
    else:
        impls = {
            "official": Official(
                official_student.to(device), official_teacher.to(device), args, device
            ),
            "ours": Ours(student.to(device), teacher.to(device), args, device),
        }
    crops = make_crops(args, device)
    for impl in impls.values():  # warm-up: optimiser state, allocator, (compile)
        timed_round(impl, crops, args.warmup, device)
    per_round: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(args.rounds):  # A/B, then B/A: neither side always runs first
        order = list(impls) if r % 2 == 0 else list(impls)[::-1]
        for name in order:
            per_round[name].append(timed_round(impls[name], crops, args.steps, device))
    med = {k: statistics.median(v) for k, v in per_round.items()}
    losses = {k: round(float(impl.read()["loss"]), 4) for k, impl in impls.items()}
    print(
        json.dumps(
            {
                "benchmark": (
                    "one DINOv2 training step (DINO + iBOT + KoLeo, Sinkhorn-Knopp): "
                    "dino_model.dinov2_step.dinov2_step vs the DINOv2 step re-created in "
                    "tests/official_dinov2.py"
                    if dinov2
                    else "one DINO training step: dino_model.step.dino_step vs the official "
                    "train_one_epoch step (tests/official_dino.py)"
                ),
                "command": command_line(),
                "machine": {
                    **machine(),
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                },
                "settings": {
                    "recipe": args.recipe,
                    "registers": args.registers if dinov2 else 0,
                    "masked_patches": int(impls["ours"].masks.masks.sum()) if dinov2 else None,
                    "device": str(device),
                    "arch": args.arch,
                    "patch": args.patch,
                    "batch": args.batch,
                    "crops": f"2x{args.global_size} + {args.local_crops}x{args.local_size}",
                    "out_dim": args.out_dim,
                    "hidden_dim": args.hidden_dim,
                    "bottleneck_dim": args.bottleneck_dim,
                    "ours_precision": args.precision,
                    "official_precision": args.official_precision
                    + (" + GradScaler" if args.official_precision == "fp16" else ""),
                    "epoch": args.epoch,
                    "frozen_last_layer": args.epoch < FREEZE_EPOCHS,
                    "rounds": args.rounds,
                    "steps_per_round": args.steps,
                    "warmup_steps": args.warmup,
                    "compile": args.compile,
                    "ours_optimizer": _optimizer_kind(impls["ours"].optimizer),
                },
                "official_step_s": round(med["official"], 4),
                "ours_step_s": round(med["ours"], 4),
                "speedup": round(med["official"] / med["ours"], 3),
                "official_images_per_s": round(args.batch / med["official"], 2),
                "ours_images_per_s": round(args.batch / med["ours"], 2),
                "per_round_step_s": {k: [round(x, 4) for x in v] for k, v in per_round.items()},
                "last_loss": losses,
                "target_speedup": 1.0,
            }
        )
    )


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    mode = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "per-parameter"
    return f"{type(optimizer).__name__} ({mode})"


if __name__ == "__main__":
    main()
