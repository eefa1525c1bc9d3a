"""The sweep's results: one row per trial, the best finished trial, a text table, CSV and plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.config import DinoConfig


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
            "images_per_s": float(m.get("epoch_images_per_s", float("nan"))),
            "checkpoint_path": m.get("checkpoint_path", ""),
            "mlflow_run_id": m.get("mlflow_run_id", ""),
            **{k: float(v) for k, v in m.items() if k.startswith("knn") and k != metric
               and isinstance(v, (int, float))},
        })
    return rows


def best_row(table: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
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
    if isinstance(v, dict):  # a group's choice: its fields without their section
        return ",".join(f"{k.split('.')[-1]}={_fmt(x)}" for k, x in v.items())
    return f"{v:.4f}" if isinstance(v, float) else str(v)


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
            x = _fmt(row.get(key)) if key else row["trial_id"]
            ax.scatter([x], [row[metric]], marker="x" if row["stopped_early"] else "o",
                       color="tab:red" if row["stopped_early"] else "tab:blue")
        ax.set_xlabel(key or "trial")
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} per trial (x = stopped early by ASHA)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
