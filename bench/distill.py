"""Distillation benchmark on CIFAR-10 (CPU): a student distilled from a DINO teacher against the
same student trained from scratch by DINO for the same wall-clock time.

    python bench/distill.py --teacher-minutes 4 --minutes 3 \
        [--train ../shared/data/cifar10/train --test ../shared/data/cifar10/test] \
        [--student-arch test_vit --student-patch 4] [--eval-limit 5000] [--out FILE]
        [--teacher CHECKPOINT]

Three legs, one after the other on the same machine:

1. teacher: DINO with ``configs/cifar10_cpu.yaml`` (timm's test_resnet) for ``--teacher-minutes``,
   or the final checkpoint of such a run given as ``--teacher`` (for example the DINO leg of
   ``bench/quality_cifar10.py``), which is then only evaluated;
2. distilled: ``dino-ray distill`` of that teacher's final checkpoint into the student for
   ``--minutes`` (``pipeline.distill_run.run_distillation``);
3. scratch: DINO with the same recipe on the same student for the same ``--minutes``.

Every leg's backbone is then evaluated the same way: k-NN top-1 at k=20 and a linear probe
(logistic regression, C picked on a split of the bank), bank = the train split, queries = the
test split (each capped at ``--eval-limit`` images, spread over the classes), beside the random
init of its architecture and raw pixels. Prints one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._corpus import command_line, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-minutes", type=float, default=4.0)
    ap.add_argument("--minutes", type=float, default=3.0, help="each student leg's budget")
    ap.add_argument("--teacher", help="a trained DINO checkpoint: skips training the teacher")
    ap.add_argument("--config", default=str(ROOT / "configs/cifar10_cpu.yaml"))
    ap.add_argument("--train", help="train split (default: the config's data.path)")
    ap.add_argument("--test", help="test split (default: the config's eval.test_path)")
    ap.add_argument("--student-arch", default="test_vit")
    ap.add_argument("--student-patch", type=int, default=4)
    ap.add_argument("--eval-limit", type=int, default=5000, help="images per eval set")
    ap.add_argument("--workdir", default=".dino-ray/bench-distill")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    from pipeline.config import DinoConfig
    from pipeline.distill_run import run_distillation
    from pipeline.evaluate.knn_eval import evaluate_knn
    from pipeline.ray_runtime import ensure_ray
    from pipeline.training_run import run_training

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = DinoConfig.load(args.config)
    train = args.train or base.data.path
    test = args.test or base.eval.test_path
    common = [
        f"data.path={train}",
        f"eval.train_path={train}",
        f"eval.val_path={test}",
        "eval.test_path=null",
        f"eval.limit={args.eval_limit}",
        "eval.every_epochs=0",
        "eval.at_end=false",  # evaluated below, every leg alike (k-NN + linear probe)
        "train.epochs=100",  # the wall-clock budget ends each leg
        f"train.storage_path={work / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
    ]
    student = [
        f"model.arch={args.student_arch}",
        f"model.patch_size={args.student_patch}",
        "model.cifar_stem=false",
    ]

    def cfg(name: str, minutes: float, extra: list[str]) -> DinoConfig:
        return DinoConfig.load(
            args.config,
            [
                *common,
                f"train.name={name}-{stamp}",
                f"train.max_wall_seconds={minutes * 60}",
                *extra,
            ],
        )

    def figures(leg_cfg: DinoConfig, checkpoint: str) -> dict:
        m = evaluate_knn(leg_cfg, checkpoint, linear=True)
        return {
            "knn_top1": m.get("knn_top1"),
            "knn_init_top1": m.get("knn_init_top1"),
            "knn_pixels_top1": m.get("knn_pixels_top1"),
            "linear_top1": m.get("linear_top1"),
            "linear_init_top1": m.get("linear_init_top1"),
            "linear_pixels_top1": m.get("linear_pixels_top1"),
            "bank_size": m.get("knn_bank_size"),
            "val_size": m.get("knn_val_size"),
        }

    def leg(run, leg_cfg: DinoConfig) -> dict:
        t0 = time.monotonic()
        result = run(leg_cfg)
        result = getattr(result, "training", result)
        out = {
            "arch": leg_cfg.model.arch,
            "steps": int(result.metrics.get("step", 0)),
            "train_wall_s": round(float(result.metrics.get("wall_s", 0.0)), 1),
            "run_wall_s": round(time.monotonic() - t0, 1),
            "final_loss": result.metrics.get("epoch_loss"),
            "checkpoint": os.path.relpath(result.checkpoint_path),
        }
        out.update(figures(leg_cfg, result.checkpoint_path))
        out["checkpoint_abs"] = result.checkpoint_path
        return out

    ensure_ray()
    load_before = os.getloadavg()
    teacher_cfg = cfg("teacher", args.teacher_minutes, ["tracking.registered_model=null"])
    if args.teacher:
        teacher = {"checkpoint": os.path.relpath(args.teacher), "trained_by": "given (--teacher)"}
        teacher.update(figures(teacher_cfg, args.teacher))
        teacher["checkpoint_abs"] = str(Path(args.teacher).resolve())
    else:
        teacher = leg(run_training, teacher_cfg)
    distill_cfg = cfg(
        "distilled", args.minutes, [*student, f"distill.teacher={teacher['checkpoint_abs']}"]
    )
    distilled = leg(run_distillation, distill_cfg)
    scratch = leg(run_training, cfg("scratch", args.minutes, student))
    for done in (teacher, distilled, scratch):
        done.pop("checkpoint_abs")  # no machine paths in the results
    out = {
        "teacher": teacher,
        "distilled_student": distilled,
        "scratch_student": scratch,
        "distilled_minus_scratch": {
            k: distilled[k] - scratch[k]
            for k in ("knn_top1", "linear_top1")
            if distilled.get(k) is not None and scratch.get(k) is not None
        },
        "budget": {
            "teacher_minutes": None if args.teacher else args.teacher_minutes,
            "student_minutes_each": args.minutes,
            "eval_limit_per_set": args.eval_limit,
            "headline_k": teacher_cfg.eval.headline_k,
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "machine": machine(),
        "command": command_line(),
    }
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
