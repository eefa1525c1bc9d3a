"""Quality benchmark: DINO on a Parquet train split for a fixed wall-clock budget, then the k-NN
top-1 at the headline k (20) and a linear probe on the test split (bank / probe training set =
the train split), for the trained teacher, the random-init backbone and raw pixels.

    python bench/quality_cifar10.py --minutes 15 [--config configs/cifar10_cpu.yaml
        [--config configs/dinov2_cifar10_cpu.yaml ...]]
        [--train ../shared/data/cifar10/train --test ../shared/data/cifar10/test] [a.b=value ...]

Any Parquet corpus works (``--train`` / ``--test``, paths relative to the working directory or
URIs). The test split is only reported, never used to choose anything (the probe picks C on a
split of the train features). Prints one JSON object: trained / random-init / pixel k-NN and
linear probe, images/s, machine, command, config; with several ``--config`` the recipes run
back to back, same budget, same machine, and the object holds one entry per recipe (``runs``)
with the load average seen before and after each.

The schedule is laid out for the budget (``pipeline.train.budget``): a short probe run (two
epochs of ``--probe-steps`` steps, not counted in the budget) measures the seconds a step and
the startup, and sets ``train.epochs`` / ``train.max_steps_per_epoch`` so that the whole
schedule (lr, weight decay, teacher momentum and temperature) ends within the budget, on any
corpus. ``--keep-epochs`` keeps the config's epochs instead. Either way the wall-clock budget
(``train.max_wall_seconds``) stops training cleanly (all ranks agree) and keeps the last state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._corpus import command_line  # noqa: E402


def _without_machine_paths(result: dict) -> str:
    """The JSON with this working directory's prefix dropped: the storage path and checkpoints
    are absolute for the Ray workers (their working directory differs), not for the reader."""
    return json.dumps(result, default=str).replace(os.getcwd() + os.sep, "")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    ap.add_argument(
        "--config",
        action="append",
        help="recipe (repeat to run several back to back; default configs/cifar10.yaml)",
    )
    ap.add_argument("--workdir", default=".dino-ray/bench-cifar10")
    ap.add_argument("--train", help="train split (default: the config's data.path)")
    ap.add_argument("--test", help="test split (default: the config's eval.test_path)")
    ap.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    ap.add_argument(
        "--keep-epochs",
        action="store_true",
        help="keep the config's train.epochs (the budget only cuts) instead of fitting them",
    )
    ap.add_argument("--probe-steps", type=int, default=8, help="steps per probe epoch")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    configs = args.config or [str(Path(__file__).resolve().parents[1] / "configs/cifar10.yaml")]

    from pipeline.ray_runtime import ensure_ray

    ensure_ray()
    runs = []
    for path in configs:
        runs.append(bench_one(path, args))
        if len(configs) > 1:  # each recipe's figures as soon as they exist (a later one may fail)
            print(_without_machine_paths({"partial": runs[-1]}), flush=True)
    out = runs[0] if len(runs) == 1 else {"runs": runs, "machine": _machine()}
    out["command"] = command_line()
    print(_without_machine_paths(out))
    return 0


def bench_one(config_path: str, args: argparse.Namespace) -> dict:
    """Probe (unless --keep-epochs), train for the budget, evaluate; one JSON-ready dict."""
    from pipeline.config import DinoConfig
    from pipeline.data.dataset import list_data
    from pipeline.train.budget import plan_for_budget, probe_overrides, timing_from_probe
    from pipeline.train.elastic import reference_epoch_images
    from pipeline.training_run import run_training

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    base = DinoConfig.load(config_path, args.overrides)
    train = args.train or base.data.path
    test = args.test or base.eval.test_path
    if test is None:
        sys.exit("no test split: pass --test or set eval.test_path in the config")
    # nothing is selected here, so SSL trains on the whole train split, the k-NN bank is the
    # whole train split and the queries are the test split, reported once at the end
    common = [
        f"train.storage_path={work / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "eval.every_epochs=0",
        "eval.at_end=true",
        f"data.path={train}",
        f"eval.train_path={train}",
        f"eval.val_path={test}",
        "eval.test_path=null",
        *args.overrides,
    ]
    budget_s = args.minutes * 60
    load_before = os.getloadavg()
    plan = None
    fitted: list[str] = []
    if not args.keep_epochs:
        probe_cfg = DinoConfig.load(
            config_path, [*common, *probe_overrides(f"{name}-probe", args.probe_steps)]
        )
        t_probe = time.monotonic()
        probe = run_training(probe_cfg, config_path=config_path)
        step_s, startup_s = timing_from_probe(probe.history)
        # one pass over the corpus (or the config's train.max_steps_per_epoch) is the longest epoch
        epoch_images, ref_batch = reference_epoch_images(base, list_data(probe_cfg.data).num_images)
        ipe = epoch_images // ref_batch
        plan = plan_for_budget(
            budget_s,
            step_s=step_s,
            startup_s=startup_s,
            max_steps_per_epoch=ipe,
            min_epochs=max(1, base.loss.warmup_teacher_temp_epochs),
        )
        fitted = plan.overrides()
        probe_wall_s = time.monotonic() - t_probe
    cfg = DinoConfig.load(
        config_path,
        [*common, f"train.max_wall_seconds={budget_s}", f"train.name={name}", *fitted],
    )
    t0 = time.monotonic()
    result = run_training(cfg, config_path=config_path)
    m = dict(result.metrics)
    hist = result.history
    if not args.no_linear and result.checkpoint_path:
        from pipeline.evaluate.knn_eval import evaluate_knn

        m.update(evaluate_knn(cfg, result.checkpoint_path, linear=True))
    steps = int(m.get("step", 0))
    train_s = float(m.get("wall_s", 0.0))
    images = steps * cfg.train.batch_size_per_worker * cfg.train.max_workers
    return {
        "config_path": config_path,
        "knn_top1_trained": m.get("knn_top1"),
        "knn_top1_random_init": m.get("knn_init_top1"),
        "knn_top1_pixels": m.get("knn_pixels_top1"),
        "knn_gain_top1": m.get("knn_gain_top1"),
        "headline_k": cfg.eval.headline_k,
        "knn_by_k": {
            k: {
                "trained": m.get(f"knn_top1_k{k}"),
                "random_init": m.get(f"knn_init_top1_k{k}"),
                "pixels": m.get(f"knn_pixels_top1_k{k}"),
            }
            for k in sorted(set(cfg.eval.k) | {cfg.eval.headline_k})
        },
        "linear_top1_trained": m.get("linear_top1"),
        "linear_top1_random_init": m.get("linear_init_top1"),
        "linear_top1_pixels": m.get("linear_pixels_top1"),
        "bank_size": m.get("knn_bank_size"),
        "val_size": m.get("knn_val_size"),
        "budget_s": budget_s,
        "budget_plan": None
        if plan is None
        else {
            "epochs": plan.epochs,
            "steps_per_epoch": plan.steps_per_epoch,
            "probe_step_s": round(plan.step_s, 3),
            "probe_startup_s": round(plan.startup_s, 1),
            "planned_train_s": round(plan.planned_s, 1),
            "probe_wall_s": round(probe_wall_s, 1),
        },
        "epochs_planned": cfg.train.epochs,
        "epochs_done": len(hist),
        "steps_planned": cfg.train.epochs * (cfg.train.max_steps_per_epoch or 0) or None,
        "steps": steps,
        "stopped_early": bool(m.get("stopped_early")),
        "train_wall_s": round(train_s, 1),
        "seconds_per_step": round(train_s / steps, 3) if steps else None,
        "images_per_s": round(images / train_s, 1) if train_s else None,
        "epoch_images_per_s_last": m.get("epoch_images_per_s"),
        "data_wait_fraction_last": m.get("epoch_data_wait_fraction"),
        "final_loss": m.get("epoch_loss"),
        "total_wall_s": round(time.monotonic() - t0, 1),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": _machine(),
        "config": cfg.model_dump(mode="json"),
        "checkpoint": result.checkpoint_path,
        "mlflow_run_id": result.mlflow_run_id,
    }


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpu": _gpu(),
        "python": platform.python_version(),
    }


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    sys.exit(main())
