"""The driver's MLflow run for one training run: opened (or reopened by a rerun) before the
workers start, with the config as params and artifacts."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.checkpoints import read_run_file, write_run_file
from pipeline.config import DinoConfig
from pipeline.tracking import Tracker
from pipeline.train.plan import RunPlan

log = logging.getLogger("dino_ray.train")

RUN_ID_FILE = "mlflow_run_id"  # in the run directory: a rerun logs to the same MLflow run


def open_tracking(cfg: DinoConfig, plan: RunPlan, config_path: str | Path | None) -> Tracker:
    """The driver's MLflow run; a rerun of the same name reopens the run it logged to, unless it
    continues with a changed config (params are immutable: it gets a new run, linked to the old)."""
    tc, tr = cfg.train, cfg.tracking
    previous_id = (read_run_file(plan.run_dir, RUN_ID_FILE) or "").strip() or None
    resume_id = None if plan.start_step == 0 or plan.new_tracking_run else previous_id
    tags = {"dino_ray.train.name": tc.name}
    if plan.new_tracking_run and previous_id:
        tags["dino_ray.continues_run"] = previous_id
    tracker = Tracker(
        tr.tracking_uri,
        tr.experiment,
        run_name=tr.run_name or tc.name,
        enabled=tr.enabled,
        resume_run_id=resume_id,
        http_timeout_s=tr.http_timeout_s,
        tags=tags,
    )
    if tracker.run_id and tracker.ok:
        try:
            write_run_file(plan.run_dir, RUN_ID_FILE, tracker.run_id)
        except OSError as exc:
            log.warning("could not record the MLflow run id in %s: %s", plan.run_dir, exc)
    tracker.log_params(cfg.flat(redact=True))
    tracker.set_tags({"run_dir": plan.run_dir, "num_images": plan.train_data.num_images})
    if config_path is not None and Path(config_path).is_file():
        tracker.log_artifact(config_path)
    tracker.log_text(cfg.to_yaml(redact=True), "resolved_config.yaml")
    return tracker
