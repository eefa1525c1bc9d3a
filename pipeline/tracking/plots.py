"""Loss and k-NN plots (matplotlib) for MLflow artifacts.

Figures are built with matplotlib's object API (``Figure``), not ``pyplot``: no backend to pick,
no global figure registry to close, so importing this module changes no process-wide state.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_training(
    steps: list[dict], epochs: list[dict], knn: dict[str, float], path: str | Path
) -> Path:
    curve = [e for e in epochs if "subset_knn_top1" in e]  # the in-training k-NN, per epoch
    fig = Figure(figsize=(16 if curve else 11, 4))
    axes = fig.subplots(1, 3 if curve else 2)
    ax = axes[0]
    if steps:
        ax.plot(
            [s["step"] for s in steps], [s["loss"] for s in steps], label="loss (step)", alpha=0.6
        )
    ep = [e for e in epochs if "epoch_loss" in e]
    if ep:
        ax.plot([e["step"] for e in ep], [e["epoch_loss"] for e in ep], "o-", label="loss (epoch)")
    ax.set_xlabel("global step")
    ax.set_ylabel("DINO loss")
    ax.set_title("training loss")
    ax.legend()
    ax = axes[1]
    ks = sorted({int(k.rsplit("k", 1)[1]) for k in knn if k.startswith("knn_top1_k")})
    if ks:
        width = 0.38
        xs = range(len(ks))
        ax.bar(
            [x - width / 2 for x in xs],
            [knn.get(f"knn_init_top1_k{k}", 0.0) for k in ks],
            width,
            label="random init",
        )
        ax.bar(
            [x + width / 2 for x in xs],
            [knn[f"knn_top1_k{k}"] for k in ks],
            width,
            label="trained teacher",
        )
        ax.set_xticks(list(xs), [f"k={k}" for k in ks])
        ax.set_ylabel("top-1 (%)")
        ax.legend()
    ax.set_title("k-NN top-1 (end of run, whole val split)")
    if curve:  # the k-NN curve over epochs, against the two baselines
        ax = axes[2]
        ax.plot(
            [e["epoch"] for e in curve],
            [e["subset_knn_top1"] for e in curve],
            "o-",
            label="trained teacher",
        )
        # the baselines on the same subset as the curve
        for key, label in (
            ("subset_knn_init_top1", "random init"),
            ("subset_knn_pixels_top1", "raw pixels"),
        ):
            if key in knn:
                ax.axhline(
                    knn[key],
                    linestyle="--",
                    color="grey" if "init" in key else "black",
                    label=label,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel("k-NN top-1 (%)")
        ax.set_title("k-NN during training (val subset)")
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def plot_attention(images, maps, path: str | Path) -> Path:
    """images: (N, S, S, 3) uint8; maps: (N, heads, h, w) -> one row per image: the image, then
    the last block's CLS attention of each head (as the official ``visualize_attention.py``)."""
    n, heads = maps.shape[0], maps.shape[1]
    fig = Figure(figsize=(1.6 * (heads + 1), 1.6 * n))
    axes = fig.subplots(n, heads + 1, squeeze=False)
    for i in range(n):
        axes[i][0].imshow(images[i])
        for h in range(heads):
            axes[i][h + 1].imshow(maps[i, h], cmap="inferno")
            if i == 0:
                axes[i][h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
