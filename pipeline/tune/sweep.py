"""Hyper-parameter sweeps: Ray Tune over DINO training, in the Ray Train V2 pattern.

``Tuner(trial_fn)`` runs one *function trainable* per trial; the trial builds its config
(``cfg.with_overrides(trial params)``) and calls ``run_training`` (which launches a ``TorchTrainer``
for that trial). ``run_training`` hands every epoch's rank-0 metrics to ``on_epoch_metrics`` on the
trial's own thread, where we ``ray.tune.report`` them, so ``ASHAScheduler`` sees ``knn_top1`` per
epoch (``eval.every_epochs`` is forced to 1) and can stop weak trials early.

MLflow: one parent run for the sweep; each trial's training run gets ``mlflow.parentRunId`` (so it
nests under the parent) and the trial parameters. At the end the parent run gets the results table
(CSV), a plot and the best trial's figures, and the best trial's teacher is registered (alias
``champion`` if it beats the registered ones).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import DinoConfig

DATA_CPUS_ON_HEAD = 0.25  # the read tasks of the data stage (see pipeline.data.dataset)
DRIVER_RESOURCES = {"CPU": 0.1}  # one Tune trial = one Ray Train driver process


@dataclass
class SweepResult:
    table: list[dict[str, Any]]  # one row per trial
    best: dict[str, Any] | None  # the best row
    parent_run_id: str | None
    registered_version: int | None
    csv_path: str | None = None
    plot_path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


# --- resources ---------------------------------------------------------------------------------
def trial_cpus(cfg: DinoConfig) -> float:
    """CPUs one trial holds: its train workers + its data actors + the read tasks, plus the
    trial driver itself (0: it only waits)."""
    t, d = cfg.train, cfg.data
    return (t.num_workers * t.cpus_per_worker + d.num_actors * d.cpus_per_actor
            + DATA_CPUS_ON_HEAD + DRIVER_RESOURCES["CPU"])


def concurrent_trials(cfg: DinoConfig, cluster: dict[str, float] | None = None) -> int:
    """How many trials fit at once on the cluster as it can grow (the nodes alive plus what the
    autoscaler may add, ``pipeline.cluster``), capped by ``tune.max_concurrent_trials`` and
    ``tune.num_samples`` (x the grid size)."""
    if cluster is None:
        from pipeline.cluster import ClusterView

        view = ClusterView.current()
        cluster = {"CPU": view.max_total("CPU"), "GPU": view.max_total("GPU")}
    fits = max(1, int(math.floor(float(cluster.get("CPU", 1)) / trial_cpus(cfg))))
    if cfg.train.use_gpu:
        fits = min(fits, max(1, int(float(cluster.get("GPU", 0)) // cfg.train.num_workers)))
    if cfg.tune.max_concurrent_trials:
        fits = min(fits, cfg.tune.max_concurrent_trials)
    return max(1, min(fits, total_trials(cfg)))


def total_trials(cfg: DinoConfig) -> int:
    return cfg.tune.num_samples * (grid_size(cfg) if cfg.tune.grid else 1)


def grid_size(cfg: DinoConfig) -> int:
    n = 1
    for choices in cfg.tune.search_space.values():
        n *= max(1, len(choices))
    return n


def param_space(cfg: DinoConfig) -> dict[str, Any]:
    """``{"loss.teacher_temp": tune.choice([...]), ...}`` (``grid_search`` when tune.grid)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, choices in cfg.tune.search_space.items():
        cfg.with_overrides({key: choices[0]})  # an unknown field fails here, naming it
        space[key] = tune.grid_search(list(choices)) if cfg.tune.grid else tune.choice(list(choices))
    return space


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_name: str,
                 storage_path: str) -> DinoConfig:
    cfg = DinoConfig.from_dict(base)
    updates = {k: v for k, v in params.items() if "." in k}
    updates.update({
        "train.name": trial_name, "train.storage_path": storage_path,
        "eval.every_epochs": 1,  # ASHA decides on the per-epoch k-NN top-1
        "tracking.run_name": trial_name,
    })
    return cfg.with_overrides(updates)


# --- the trainable -----------------------------------------------------------------------------
def train_trial(params: dict[str, Any]) -> None:
    """Tune function trainable: one DINO training run (a TorchTrainer) per trial."""
    import ray.tune

    from pipeline.train.trainer import run_training

    ctx = ray.tune.get_context()
    name = trial_name(params["_sweep"], ctx.get_trial_id())
    cfg = trial_config(params["_base"], params, name, params["_storage"])
    metric = cfg.tune.metric
    reported: list[dict] = []

    def on_epoch(m: dict[str, Any]) -> None:
        row = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row["epoch"] = int(m.get("epoch", len(reported))) + 1  # training_iteration-like, from 1
        if metric not in row:
            return  # no eval this epoch: nothing ASHA can use
        reported.append(row)
        ray.tune.report(row)

    result = run_training(cfg, on_epoch_metrics=on_epoch)
    final = {k: v for k, v in result.metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update({"checkpoint_path": result.checkpoint_path or "",
                  "mlflow_run_id": result.mlflow_run_id or "", "final": 1})
    if metric in final:
        final["epoch"] = (reported[-1]["epoch"] + 1) if reported else 1
        ray.tune.report(final)  # the last statement: ASHA may end the trial right here


def trial_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-t{trial_id}"


# --- the sweep ---------------------------------------------------------------------------------
def run_sweep(cfg: DinoConfig, *, address: str | None = None, register: bool = True,
              name: str | None = None) -> SweepResult:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.ray_runtime import ensure_ray
    from pipeline.train.checkpoint import resolve_storage_path

    ensure_ray(address)
    tc = cfg.tune
    sweep = name or f"{cfg.train.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = resolve_storage_path(cfg.train.storage_path)
    space = param_space(cfg)
    concurrency = concurrent_trials(cfg)
    print(f"sweep {sweep}: {total_trials(cfg)} trial(s), {concurrency} at a time "
          f"({trial_cpus(cfg):g} CPU each of {ray.cluster_resources().get('CPU', 0):g}); "
          f"searching {', '.join(space)}", flush=True)

    parent = _ParentRun(cfg, sweep)
    base = cfg.model_dump(mode="json")
    space.update({"_base": base, "_sweep": sweep, "_storage": storage,
                  "_parent_run_id": parent.run_id})
    # max_t above the last report (epochs + the final one), so only the rungs stop trials
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs + 2,
                              grace_period=tc.grace_period, reduction_factor=tc.reduction_factor)
    tuner = tune.Tuner(
        # the trial is only the Train driver (it waits); the TorchTrainer workers and the data
        # actors it starts reserve the real CPUs/GPUs
        tune.with_resources(train_trial, dict(DRIVER_RESOURCES)),
        param_space=space,
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, scheduler=scheduler,
                                    num_samples=tc.num_samples,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=sweep, storage_path=storage, verbose=1),
    )
    grid = tuner.fit()
    table = results_table(grid, cfg)
    parent.adopt_children(table, sweep, cfg)
    best = _best(table, tc.metric, tc.mode)
    csv_path, plot_path = parent.log_results(table, best, cfg)
    print(format_table(table, cfg), flush=True)
    version = None
    if register and tc.register_best and best is not None and best.get("checkpoint_path") and cfg.tracking.enabled:
        from pipeline.registry.register import register_teacher

        version = register_teacher(
            best["checkpoint_path"], None, metrics={k: best[k] for k in best
                                                    if k.startswith("knn")},
            run_id=best.get("mlflow_run_id") or None, tracking_uri=cfg.tracking.tracking_uri,
            name=cfg.tracking.registered_model, set_champion=True,
            extra_tags={"sweep": sweep, "trial_id": str(best["trial_id"])})
        print(f"registered best trial {best['trial_id']} as {cfg.tracking.registered_model} "
              f"version {version}", flush=True)
        parent.set_tag("registered_version", str(version))
    parent.finish("FINISHED" if best is not None else "FAILED")
    return SweepResult(table, best, parent.run_id, version, csv_path, plot_path)


def results_table(grid, cfg: DinoConfig) -> list[dict[str, Any]]:
    rows = []
    metric = cfg.tune.metric
    for res in grid:
        params = {k: v for k, v in (res.config or {}).items() if not k.startswith("_")}
        m = res.metrics or {}
        history = res.metrics_dataframe
        epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        best_metric = (float(history[metric].max() if cfg.tune.mode == "max" else
                             history[metric].min())
                       if history is not None and metric in history else float("nan"))
        rows.append({
            "trial_id": str(m.get("trial_id") or (res.path or "?").rstrip("/").split("/")[-1]),
            **params,
            metric: float(m.get(metric, float("nan"))),
            f"best_{metric}": best_metric,
            "epochs_reported": epochs,
            "stopped_early": not bool(m.get("final")),
            "status": "ERROR" if res.error else "OK",
            "checkpoint_path": m.get("checkpoint_path", ""),
            "mlflow_run_id": m.get("mlflow_run_id", ""),
            **{k: float(v) for k, v in m.items() if k.startswith("knn") and k != metric
               and isinstance(v, (int, float))},
        })
    return rows


def _best(table: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    done = [r for r in table if r["status"] == "OK" and not r["stopped_early"]
            and not math.isnan(r[metric])]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r[metric])


def format_table(table: list[dict[str, Any]], cfg: DinoConfig) -> str:
    cols = ["trial_id", *cfg.tune.search_space, cfg.tune.metric, "epochs_reported",
            "stopped_early", "status"]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class _ParentRun:
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
            exp_id = (exp.experiment_id if exp is not None
                      else self.client.create_experiment(cfg.tracking.experiment))
            run = self.client.create_run(exp_id, run_name=sweep,
                                         tags={"dino_ray.kind": "sweep", "dino_ray.sweep": sweep})
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
                    [exp.experiment_id], f"tags.`dino_ray.train.name` = '{name}'",
                    order_by=["attributes.start_time DESC"], max_results=1)
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
                self.client.log_metric(self.run_id, f"best_{cfg.tune.metric}",
                                       float(best[cfg.tune.metric]))
                for key in cfg.tune.search_space:
                    self.client.set_tag(self.run_id, f"best.{key}", redact(str(best.get(key))))
                self.client.set_tag(self.run_id, "best_trial", str(best["trial_id"]))
        return str(csv_path), (str(plot_path) if plot_path else None)

    def finish(self, status: str) -> None:
        if self.client and self.run_id:
            self.client.set_terminated(self.run_id, status)


def write_csv(table: list[dict[str, Any]], path: str | Path) -> None:
    import csv

    cols: list[str] = []
    for row in table:
        cols += [c for c in row if c not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table)


def plot_results(table: list[dict[str, Any]], cfg: DinoConfig, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = cfg.tune.metric
    keys = list(cfg.tune.search_space)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2),
                             squeeze=False)
    for ax, key in zip(axes[0], keys or [None]):
        for row in table:
            x = str(row.get(key)) if key else row["trial_id"]
            ax.scatter([x], [row[metric]], marker="x" if row["stopped_early"] else "o",
                       color="tab:red" if row["stopped_early"] else "tab:blue")
        ax.set_xlabel(key or "trial")
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} per trial (x = stopped early by ASHA)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
