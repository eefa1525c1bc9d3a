"""The sweep's MLflow parent run: trial runs nested under it, the results table, plot and the
best trial's figures (validation, and the once-only test report) logged on it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import DinoConfig
from pipeline.tune.report import plot_results, write_csv
from pipeline.tune.trainable import trial_name


class ParentRun:
    """The sweep's MLflow parent run (no-op when tracking is off or unreachable)."""

    def __init__(self, cfg: DinoConfig, sweep: str) -> None:
        self.client = None
        self.run_id: str | None = None
        if not cfg.tracking.enabled:
            return
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(cfg.tracking.experiment)
            )
            run = self.client.create_run(
                exp_id, run_name=sweep, tags={"dino_ray.kind": "sweep", "dino_ray.sweep": sweep}
            )
            self.run_id = run.info.run_id
            for key, value in cfg.flat(redact=True).items():
                if key.startswith("tune."):
                    self.client.log_param(self.run_id, key, str(value)[:6000])
        except Exception as exc:  # noqa: BLE001
            print(f"sweep: MLflow parent run unavailable ({exc}); continuing without", flush=True)
            self.client = None

    def adopt_children(self, table: list[dict[str, Any]], sweep: str, cfg: DinoConfig) -> None:
        """Nest each trial's training run under the parent run (``mlflow.parentRunId``), tag it
        with the trial's parameters, and close the runs of trials ASHA stopped (their process
        was ended mid-training, so their run is still RUNNING)."""
        if not (self.client and self.run_id):
            return
        from pipeline.redact import redact

        try:
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            for row in table:
                name = trial_name(sweep, row["trial_id"])
                runs = self.client.search_runs(
                    [exp.experiment_id],
                    f"tags.`dino_ray.train.name` = '{name}'",
                    order_by=["attributes.start_time DESC"],
                    max_results=1,
                )
                if not runs:
                    continue
                run = runs[0]
                row["mlflow_run_id"] = row.get("mlflow_run_id") or run.info.run_id
                self.client.set_tag(run.info.run_id, "mlflow.parentRunId", self.run_id)
                self.client.set_tag(run.info.run_id, "dino_ray.sweep", sweep)
                self.client.set_tag(run.info.run_id, "trial_id", row["trial_id"])
                for key in cfg.tune.search_space:
                    self.client.set_tag(run.info.run_id, f"trial.{key}", redact(str(row.get(key))))
                if row["stopped_early"] and run.info.status == "RUNNING":
                    self.client.set_tag(run.info.run_id, "stopped_by", "ASHA")
                    self.client.set_terminated(run.info.run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not fail the sweep
            print(f"sweep: could not nest the trial runs ({exc})", flush=True)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        if self.client and self.run_id:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.client.log_metric(self.run_id, key, float(value))

    def set_tag(self, key: str, value: str) -> None:
        if self.client and self.run_id:
            self.client.set_tag(self.run_id, key, value)

    def log_results(self, table, best, cfg) -> tuple[str | None, str | None]:
        out = Path(tempfile.mkdtemp(prefix="dino-sweep-"))
        csv_path = out / "sweep_results.csv"
        write_csv(table, csv_path)
        plot_path = out / "sweep_results.png"
        try:
            plot_results(table, cfg, plot_path)
        except Exception as exc:  # noqa: BLE001
            print(f"sweep: no plot ({exc})", flush=True)
            plot_path = None
        if self.client and self.run_id:
            from pipeline.redact import redact

            self.client.log_artifact(self.run_id, str(csv_path))
            if plot_path is not None:
                self.client.log_artifact(self.run_id, str(plot_path))
            if best is not None:
                self.client.log_metric(
                    self.run_id, f"best_{cfg.tune.metric}", float(best[cfg.tune.metric])
                )
                for key in cfg.tune.search_space:
                    self.client.set_tag(self.run_id, f"best.{key}", redact(str(best.get(key))))
                self.client.set_tag(self.run_id, "best_trial", str(best["trial_id"]))
        return str(csv_path), (str(plot_path) if plot_path else None)

    def finish(self, status: str) -> None:
        if self.client and self.run_id:
            self.client.set_terminated(self.run_id, status)
