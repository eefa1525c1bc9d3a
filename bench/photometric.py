"""Photometric throughput: ``dino_model.photometric`` on a batch (CPU tensors on one core, and CUDA
when there is one) vs the OpenCV recipe's photometric part (``augment.apply_photometric``, one
image at a time) on one core, for DINO's 2 x 224 + 8 x 96 crops.

Both sides start from the same geometry-only uint8 crops (smooth random colour fields with fine
texture) and do only what ``augment.photometric=device`` moves off the crop actors: parameter
draws, jitter in a random order, grayscale, blur, solarize. An "image" is all ten views of one
source image. For scale, the whole crop actor's work per image (decode a ~500x375 JPEG + all
views) is timed with ``augment.photometric`` cpu and device: what a core does in either mode.
The batch path is timed per batch of ``--batch`` images (all views); CUDA times include the
synchronisation at the end of each batch, not the host-to-device copy (the loop makes that copy
for normalisation anyway). Rounds alternate between implementations; best and median.

    python bench/photometric.py [--batch 64] [--batches 3] [--rounds 5] [--core 0]
    python bench/photometric.py --global-size 64 --local-size 32 --batch 8 --rounds 2  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._corpus import command_line, machine  # noqa: E402


def crops(n: int, size: int, seed: int):
    """(n, size, size, 3) uint8: a random tint + smooth colour variation + fine texture."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        coarse = cv2.resize(
            rng.normal(0, 50, (6, 6, 3)).astype(np.float32),
            (size, size),
            interpolation=cv2.INTER_CUBIC,
        )
        fine = rng.normal(0, 12, (size, size, 3)).astype(np.float32)
        out[i] = np.clip(rng.uniform(40, 215, 3) + coarse + fine, 0, 255)
    return out


def jpegs(n: int, seed: int) -> list[bytes]:
    """``n`` 500x375 JPEGs (quality 90) of the same kind of content."""
    import io

    from PIL import Image

    out = []
    for arr in crops(n, 500, seed):
        buf = io.BytesIO()
        Image.fromarray(arr[:375]).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3, help="batches per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--num-local", type=int, default=8)
    ap.add_argument("--core", type=int, default=0)
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    import cv2
    import numpy as np
    import torch

    from dino_model.photometric import generator_for, photometric
    from pipeline.config import AugmentConfig
    from pipeline.data.augment import apply_photometric, sample_view_params, view_specs
    from pipeline.train.device_augment import view_recipes

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cfg = AugmentConfig(
        global_size=args.global_size, local_size=args.local_size, num_local=args.num_local
    )
    specs, recipes = view_specs(cfg), view_recipes(cfg)
    n = args.batch
    views = {s.name: crops(n, s.size, seed=v) for v, s in enumerate(specs)}
    cpu_batches = {k: torch.from_numpy(v) for k, v in views.items()}
    cuda = torch.cuda.is_available()
    gpu_batches = {k: v.cuda() for k, v in cpu_batches.items()} if cuda else None

    def recipe_cpu(step: int) -> None:  # one image (all views) at a time, as the crop actors do
        rng = np.random.default_rng(step)
        for i in range(n):
            for s in specs:
                p = sample_view_params(rng, s.size, s.size, s, cfg)
                apply_photometric(views[s.name][i], p, cfg.solarize_threshold)

    def batched(batches) -> None:
        def run(step: int) -> None:
            for v, (name, x) in enumerate(batches.items()):
                photometric(x, recipes[name], generator_for(0, 0, step, 0, v))
            if batches is gpu_batches:
                torch.cuda.synchronize()

        return run

    from pipeline.data.augment import MultiCrop

    files = jpegs(n, seed=99)

    def actor(mode: str):
        mc = MultiCrop(cfg.model_copy(update={"photometric": mode}))

        def run(step: int) -> None:
            for i, data in enumerate(files):
                mc(data, np.random.default_rng([step, i]))

        return run

    impls = {
        "cpu_recipe_one_core": recipe_cpu,
        "device_code_on_cpu_one_core": batched(cpu_batches),
        "actor_decode_crop_photometric_cpu_one_core": actor("cpu"),
        "actor_decode_crop_photometric_device_one_core": actor("device"),
    }
    if cuda:
        impls["device_code_on_cuda"] = batched(gpu_batches)
    for fn in impls.values():  # warm-up (imports, allocator, cuDNN plans)
        fn(0)
    rates: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(args.rounds):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            for b in range(args.batches):
                fn(1 + r * args.batches + b)
            rates[name].append(n * args.batches / (time.perf_counter() - t0))
    best = {k: round(max(v), 1) for k, v in rates.items()}
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    ref = best["cpu_recipe_one_core"]
    out = {
        "benchmark": f"photometric images/s (2x{args.global_size} + {args.num_local}x"
        f"{args.local_size} crops per image, batch {n})",
        "command": command_line(),
        "machine": machine(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "batch": n,
        "batches_per_round": args.batches,
        "rounds": args.rounds,
        "pinned_core": args.core,
        "images_per_s_best": best,
        "images_per_s_median": med,
        "ratio_device_code_on_cpu_vs_recipe_per_core": round(
            best["device_code_on_cpu_one_core"] / ref, 2
        ),
    }
    out["ratio_actor_throughput_device_vs_cpu_mode"] = round(
        best["actor_decode_crop_photometric_device_one_core"]
        / best["actor_decode_crop_photometric_cpu_one_core"],
        2,
    )
    if cuda:
        out["ratio_cuda_vs_recipe_per_core"] = round(best["device_code_on_cuda"] / ref, 1)
        out["cuda_ms_per_batch_best"] = round(1000 * n / best["device_code_on_cuda"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
