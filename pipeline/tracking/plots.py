"""Loss and k-NN plots (matplotlib, Agg backend) for MLflow artifacts."""

from __future__ import annotations

from pathlib import Path


def plot_training(steps: list[dict], epochs: list[dict], knn: dict[str, float], path: str | Path
                  ) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if steps:
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="loss (step)",
                alpha=0.6)
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
        ax.bar([x - width / 2 for x in xs], [knn.get(f"knn_init_top1_k{k}", 0.0) for k in ks],
               width, label="random init")
        ax.bar([x + width / 2 for x in xs], [knn[f"knn_top1_k{k}"] for k in ks], width,
               label="trained teacher")
        ax.set_xticks(list(xs), [f"k={k}" for k in ks])
        ax.set_ylabel("top-1 (%)")
        ax.legend()
    ax.set_title("k-NN top-1")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
