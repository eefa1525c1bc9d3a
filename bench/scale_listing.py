"""Planning at ImageNet scale: a synthetic listing of 10k and 1.28M images through planning (the
read tasks of a window of 1 or 100 epochs) and the first batch of the real stream, with peak
memory of the driver and its Ray processes and of the object store.

    python bench/scale_listing.py [--rows 10000 1280000] [--epochs 1 100]

The listing is synthetic (the images need not exist for planning): every entry names one of 32
small real JPEGs, so the first batch decodes and crops real images. Each (rows, epochs) point
runs in its own process, so peak memory is its own. Prints one JSON object: per point ``rows``,
``epochs``, ``list_s``, ``plan_s`` (``get_read_tasks`` for the window), ``read_tasks``,
``tasks_pickled_mib`` (what Ray Data ships), ``first_batch_s``, ``peak_rss_mib`` (driver + Ray
processes it started), ``object_store_mib`` (peak); and per size the 100-epoch / 1-epoch ratios.
Targets (issue 12): 1.28M rows plan in under 60 s on 2 cores; peak memory grows < 1.5x from 1 to
100 epochs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._corpus import command_line, machine  # noqa: E402


def one_point(rows: int, epochs: int) -> dict:
    import cloudpickle
    import numpy as np
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray
    from PIL import Image

    from bench.ingest import ProcessSampler
    from pipeline.config import AugmentConfig, DataConfig
    from pipeline.data.dataset import build_train_dataset
    from pipeline.data.datasource import CorpusDatasource
    from pipeline.data.sources import Corpus
    from pipeline.data.state import DataHandle, stream_end

    tmp = Path(tempfile.mkdtemp(prefix="dino-scale-"))
    rng = np.random.default_rng(0)
    files = []
    for i in range(32):
        path = tmp / f"{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, "JPEG")
        files.append(str(path))
    t0 = time.perf_counter()
    entries = pa.table(
        {
            "path": pa.array([files[i % 32] for i in range(rows)], pa.string()),
            "label": pa.array(np.arange(rows) % 1000, pa.int64()),
        }
    )
    corpus = Corpus(
        "files",
        pafs.LocalFileSystem(),
        entries,
        [str(c) for c in range(1000)],
        True,
        num_images=rows,
        description="synthetic",
    )
    list_s = time.perf_counter() - t0

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with ProcessSampler() as mem:
        # planning alone: what the executor does when an execution starts
        # the window the training loop asks for: all epochs, cut to data.stream_rows rows
        handle = DataHandle()
        handle.set_epoch(0, stream_end(0, epochs, rows, DataConfig().stream_rows))
        source = CorpusDatasource(corpus, seed=0, state=handle, rows_per_task=256)
        t0 = time.perf_counter()
        tasks = source.get_read_tasks(200)
        plan_s = time.perf_counter() - t0
        pickled = sum(len(cloudpickle.dumps(t)) for t in tasks)
        n_tasks = len(tasks)
        del tasks
        # the first batch of the real stream (listing -> plan -> read -> decode + crops)
        aug = AugmentConfig(global_size=32, local_size=16, num_local=2)
        td = build_train_dataset(
            DataConfig(path=str(tmp), num_actors=1, map_batch_size=32), aug, corpus=corpus
        )
        td.set_epoch(0, until=epochs)
        t0 = time.perf_counter()
        batch = next(iter(td.dataset.iter_batches(batch_size=32)))
        first_batch_s = time.perf_counter() - t0
        assert len(batch["global_0"]) == 32
    ray.shutdown()
    return {
        "rows": rows,
        "epochs": epochs,
        "list_s": round(list_s, 2),
        "plan_s": round(plan_s, 2),
        "read_tasks": n_tasks,
        "tasks_pickled_mib": round(pickled / 2**20, 2),
        "first_batch_s": round(first_batch_s, 2),
        "peak_rss_mib": round(mem.peak_rss / 2**20),
        "object_store_mib": round(mem.peak_plasma / 2**20),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_280_000])
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--one", type=int, nargs=2, metavar=("ROWS", "EPOCHS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_point(*args.one)))
        return 0
    points = []
    for rows in args.rows:
        for epochs in args.epochs:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(rows), str(epochs)],
                capture_output=True,
                text=True,
                check=True,
            )
            points.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    growth = {}
    lo, hi = min(args.epochs), max(args.epochs)
    for rows in args.rows:
        a = next(p for p in points if p["rows"] == rows and p["epochs"] == lo)
        b = next(p for p in points if p["rows"] == rows and p["epochs"] == hi)
        growth[str(rows)] = {
            f"peak_rss_{hi}_over_{lo}_epochs": round(b["peak_rss_mib"] / a["peak_rss_mib"], 3),
            f"plan_s_{hi}_over_{lo}_epochs": round(b["plan_s"] / max(a["plan_s"], 1e-3), 2),
        }
    print(
        json.dumps(
            {
                "bench": "scale_listing",
                "machine": machine(),
                "command": command_line(),
                "points": points,
                "growth": growth,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
