"""The sweep's MLflow parent run: trial runs nested under it, the results table, plot and the
best trial's figures (validation, and the once-only test report) logged on it.

Its params, metrics, tags and artifacts go through ``pipeline.tracking.Tracker``, as a training
run's do: queued and sent in the background, kept and retried while the server is down, the run
closed with a bounded wait. An MLflow outage at the end of a sweep therefore never stops the
results table, the test report or the registration, nor leaves the parent run RUNNING once the
server is back.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import DinoConfig
from pipeline.redact import redact
from pipeline.tracking import Tracker
from pipeline.tune.report import plot_results, write_csv
from pipeline.tune.trainable import trial_name

log = logging.getLogger("dino_ray.tune")


class ParentRun:
    """The sweep's MLflow parent run (no-op when tracking is off or the server refuses it)."""

    def __init__(self, cfg: DinoConfig, sweep: str) -> None:
        tr = cfg.tracking
        self.tracker = Tracker(
            tr.tracking_uri,
            tr.experiment,
            run_name=sweep,
            enabled=tr.enabled,
            http_timeout_s=tr.http_timeout_s,
            tags={"dino_ray.kind": "sweep", "dino_ray.sweep": sweep},
        )
        self.run_id: str | None = self.tracker.run_id
        self.client = MlflowClient(tracking_uri=tr.tracking_uri) if self.tracker.ok else None
        self.tracker.log_params(
            {k: v for k, v in cfg.flat(redact=True).items() if k.startswith("tune.")}
        )

    def adopt_children(self, table: list[dict[str, Any]], sweep: str, cfg: DinoConfig) -> None:
        """Nest each trial's training run under the parent run (``mlflow.parentRunId``), tag it
        with the trial's parameters, and close the runs of trials ASHA stopped (their process
        was ended mid-training, so their run is still RUNNING)."""
        if not (self.client and self.run_id):
            return
        try:
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            for row in table:
                self._adopt(exp.experiment_id, row, sweep, cfg)
        except (MlflowException, OSError) as exc:  # bookkeeping must not fail the sweep
            log.warning("sweep: could not nest the trial runs under %s (%s)", self.run_id, exc)

    def _adopt(self, experiment_id: str, row: dict[str, Any], sweep: str, cfg: DinoConfig) -> None:
        name = trial_name(sweep, row["trial_id"])
        runs = self.client.search_runs(
            [experiment_id],
            f"tags.`dino_ray.train.name` = '{name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            return
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

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.tracker.log_metrics(metrics)

    def set_tag(self, key: str, value: str) -> None:
        self.tracker.set_tags({key: value})

    def log_results(self, table, best, cfg) -> tuple[str | None, str | None]:
        """The results table (CSV) and plot, written locally and logged; the best trial's
        figure and parameters. Returns the local (csv, plot) paths."""
        out = Path(tempfile.mkdtemp(prefix="dino-sweep-"))
        csv_path = out / "sweep_results.csv"
        write_csv(table, csv_path)
        plot_path: Path | None = out / "sweep_results.png"
        try:
            plot_results(table, cfg, plot_path)
        except Exception as exc:  # noqa: BLE001 - a plot never fails a sweep: said, then on
            log.warning("sweep: no plot (%r)", exc)
            plot_path = None
        self.tracker.log_artifact(csv_path)
        if plot_path is not None:
            self.tracker.log_artifact(plot_path)
        if best is not None:
            self.tracker.log_metrics({f"best_{cfg.tune.metric}": float(best[cfg.tune.metric])})
            self.tracker.set_tags(
                {f"best.{key}": str(best.get(key)) for key in cfg.tune.search_space}
                | {"best_trial": str(best["trial_id"])}
            )
        return str(csv_path), (str(plot_path) if plot_path else None)

    def finish(self, status: str) -> None:
        """Send what is queued and close the run (bounded; never raises)."""
        self.tracker.finish(status)
        self.run_id = self.tracker.run_id
