"""The sweep's results: one row per trial, the best finished trial, a text table, CSV and plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from pipeline.config import DinoConfig
from pipeline.train.knn import in_training_name


def results_table(grid, cfg: DinoConfig) -> list[dict[str, Any]]:
    """One row per trial: ``tune.metric`` at the end of the run (the whole validation split,
    what the sweep selects on) and the per-epoch in-training figure ASHA read (``subset_*``, on
    ``eval.in_training_limit`` validation images), named apart."""
    rows = []
    metric = cfg.tune.metric
    per_epoch = in_training_name(metric)
    for res in grid:
        params = {k: v for k, v in (res.config or {}).items() if not k.startswith("_")}
        m = res.metrics or {}
        history = res.metrics_dataframe
        epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        best_metric = (
            float(history[per_epoch].max() if cfg.tune.mode == "max" else history[per_epoch].min())
            if history is not None and per_epoch in history
            else float("nan")
        )
        rows.append(
            {
                "trial_id": str(m.get("trial_id") or (res.path or "?").rstrip("/").split("/")[-1]),
                **params,
                metric: float(m.get(metric, float("nan"))),
                f"best_{per_epoch}": best_metric,
                f"{per_epoch}_by_epoch": (
                    [round(float(v), 2) for v in history[per_epoch].dropna()]
                    if history is not None and per_epoch in history
                    else []
                ),
                "epochs_reported": epochs,
                "stopped_early": not bool(m.get("final")),
                "status": "ERROR" if res.error else "OK",
                "images_per_s": float(m.get("epoch_images_per_s", float("nan"))),
                "checkpoint_path": m.get("checkpoint_path", ""),
                "mlflow_run_id": m.get("mlflow_run_id", ""),
                **{
                    k: float(v)
                    for k, v in m.items()
                    if k.startswith(("knn", "subset_knn"))
                    and k not in (metric, per_epoch)
                    and isinstance(v, (int, float))
                },
            }
        )
    return rows


def best_row(table: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    done = [
        r
        for r in table
        if r["status"] == "OK" and not r["stopped_early"] and not math.isnan(r[metric])
    ]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r[metric])


def format_table(table: list[dict[str, Any]], cfg: DinoConfig) -> str:
    cols = [
        "trial_id",
        *cfg.tune.search_space,
        cfg.tune.metric,
        "epochs_reported",
        "stopped_early",
        "status",
    ]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in table]
    note = (
        f"{cfg.tune.metric}: end of run, whole validation split (the selection); "
        f"ASHA stopped trials on {in_training_name(cfg.tune.metric)} "
        f"(in training, <= {cfg.eval.in_training_limit:,} validation images)"
    )
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(cols)
    ]
    lines = [note, "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_markdown(
    table: list[dict[str, Any]],
    cfg: DinoConfig,
    path: str | Path,
    best: dict[str, Any] | None = None,
    test: dict[str, Any] | None = None,
    title: str = "Sweep results",
) -> None:
    """The results as a Markdown table (best validation figure first), with the best trial's
    once-only test figures underneath: what ``bench/results/`` keeps in the repository."""
    metric = cfg.tune.metric
    keys = list(cfg.tune.search_space)
    rows = sorted(
        table,
        key=lambda r: (
            -(
                r.get(metric)
                if isinstance(r.get(metric), float) and not math.isnan(r[metric])
                else -1e9
            )
        ),
    )
    head = [
        "trial",
        *keys,
        f"val subset {in_training_name(metric)} by epoch",
        "random init",
        "raw pixels",
        "img/s",
        "stopped early",
        "status",
    ]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["trial_id"],
            *(_fmt(r.get(k, "")) for k in keys),
            " > ".join(f"{v:.1f}" for v in r.get(f"{in_training_name(metric)}_by_epoch", []))
            or "-",
            _fmt(r.get("knn_init_top1", float("nan"))),
            _fmt(r.get("knn_pixels_top1", float("nan"))),
            f"{r.get('images_per_s', float('nan')):.0f}",
            "yes" if r.get("stopped_early") else "no",
            r.get("status", ""),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if best is not None:
        lines += [
            "",
            f"Best trial on the whole validation split at the end of its run: "
            f"{best['trial_id']} ({metric} {best[metric]:.2f}"
            f"{_on_images(best.get(_size_key(metric)))}).",
        ]
    if test:
        lines += [
            "",
            "Its teacher on the test split, evaluated once after the selection "
            f"(bank: the whole train split): k-NN top-1 {test.get('test_knn_top1', 0):.2f}, "
            f"random init {test.get('test_knn_init_top1', 0):.2f}, raw pixels "
            f"{test.get('test_knn_pixels_top1', 0):.2f}.",
        ]
    Path(path).write_text("\n".join(lines) + "\n")


def _size_key(metric: str) -> str:
    """``knn_top1`` -> ``knn_val_size``: how many validation images the figure was on."""
    return f"{metric.split('_top')[0]}_val_size"


def _on_images(n: Any) -> str:
    return f" on {int(n):,} images" if isinstance(n, (int, float)) and n == n else ""


def _fmt(v: Any) -> str:
    if isinstance(v, dict):  # a group's choice: its fields without their section
        return ",".join(f"{k.split('.')[-1]}={_fmt(x)}" for k, x in v.items())
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_csv(table: list[dict[str, Any]], path: str | Path) -> None:
    cols: list[str] = []
    for row in table:
        cols += [c for c in row if c not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table)


def plot_results(table: list[dict[str, Any]], cfg: DinoConfig, path: str | Path) -> None:
    # imported here: pyplot costs 1.1 s of CPU after pipeline.tune (measured: python -c,
    # process_time), and every Tune trial process imports this module through the package
    # (it unpickles pipeline.tune.trainable); only the sweep's driver plots. Agg is chosen
    # before pyplot is imported, without changing the backend of whoever imports this module
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    metric = cfg.tune.metric
    keys = list(cfg.tune.search_space)
    fig, axes = plt.subplots(
        1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False
    )
    scored = [r for r in table if isinstance(r.get(metric), float) and not math.isnan(r[metric])]
    for ax, key in zip(axes[0], keys or [None]):
        # categorical x: every choice in the order of the search space, then the trial ids
        labels = (
            [_fmt(c) for c in cfg.tune.search_space[key]]
            if key
            else [r["trial_id"] for r in scored]
        )
        for row in scored:  # an errored or unfinished trial has no figure to place
            x = labels.index(_fmt(row.get(key)) if key else row["trial_id"])
            ax.scatter(
                [x],
                [row[metric]],
                marker="x" if row["stopped_early"] else "o",
                color="tab:red" if row["stopped_early"] else "tab:blue",
            )
        ax.set_xticks(range(len(labels)), [lab.replace(",", "\n") for lab in labels], fontsize=6)
        ax.set_xlabel(key or "trial")
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} per trial (x = stopped early by ASHA)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
