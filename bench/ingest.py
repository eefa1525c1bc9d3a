"""End-to-end ingest: Ray Data (list -> decode+multi-crop actors -> iter_torch_batches) vs the same
decode+crop function run standalone on the same number of CPU processes (measured before and
after the Ray run), the CPU seconds each role used (crop actors, consumer, Ray), plus peak memory of
the Ray processes and of the object store for a small and a 5x larger corpus (should be flat:
streaming holds a bounded number of blocks, whatever the corpus size). From the first batch on,
each role's share of the machine's CPU time and the crop processes' images per CPU second against
one standalone process: the ratio after the first batch is about their product.

    python bench/ingest.py [--images 200] [--scale 5] [--actors 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._corpus import command_line, machine, make_jpegs  # noqa: E402

_WORKER = {}


def _init_worker() -> None:
    import cv2

    from pipeline.config import AugmentConfig
    from pipeline.data.augment import MultiCrop

    cv2.setNumThreads(1)
    _WORKER["mc"] = MultiCrop(AugmentConfig())


def _crop_files(paths: list[str]) -> int:
    from pipeline.data.dataset import image_rng

    mc = _WORKER["mc"]
    for p in paths:
        with open(p, "rb") as f:
            mc(f.read(), image_rng(0, 0, p))
    return len(paths)


def standalone_rate(files: list[str], procs: int) -> float:
    chunks = [files[i : i + 16] for i in range(0, len(files), 16)]
    with mp.get_context("spawn").Pool(procs, initializer=_init_worker) as pool:
        pool.map(_crop_files, [files[:4]] * procs)  # warm-up: imports done in every process
        t0 = time.perf_counter()
        n = sum(pool.map(_crop_files, chunks))
        return n / (time.perf_counter() - t0)


def process_role(p) -> str:
    """Which part of the pipeline a process is, from the title Ray gives its workers."""
    name = " ".join(p.cmdline()[:1]) or p.name()
    if "MapWorker" in name:
        return "crop_actors"
    if "ReadListCorpus" in name or "ray::IDLE" in name:
        return "read_tasks_and_idle_workers"
    if name.startswith("ray::"):
        return "other_ray_actors"  # Ray Data's stats/autoscaling actors, our DataState
    return "ray_system"  # raylet, gcs, dashboard, log monitor


class ProcessSampler:
    """Samples this driver and the Ray processes it started: peak summed RSS, peak plasma
    (object store) usage, and the CPU seconds each role used (``cpu_by_role``)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_rss, self.peak_plasma = interval, 0, 0
        # pid -> (role, title, create_time, CPU s at its first sample, CPU s at its last)
        self._procs: dict[int, tuple[str, str, float, float, float]] = {}
        self._sweeps = 0
        self._mark_wanted = False
        self._at_mark: dict[int, float] | None = None  # pid -> CPU s at ``mark()``
        self.mark_time: float | None = None
        self._own_at_mark = 0.0
        self.own_cpu_s = 0.0
        self.plasma_timeline: list[int] = []  # MiB, one sample a second: a plateau = bounded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        last_plasma = 0.0
        while not self._stop.is_set():
            total = 0
            # this driver and everything it started (gcs, raylet, workers, actors): other Ray
            # clusters on the machine are not counted
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    cpu = t.user + t.system
                    role = "consumer_driver" if p.pid == me.pid else process_role(p)
                    if p.pid in self._procs:
                        born, first = self._procs[p.pid][2:4]
                    else:  # a process born while sampling counts from its birth
                        born, first = p.create_time(), 0.0 if self._sweeps else cpu
                    # the latest role and title: a new worker is "python" until Ray names its task
                    title = (p.cmdline()[:1] or [p.name()])[0].split("/")[-1][:60]
                    self._procs[p.pid] = (role, title, born, first, cpu)
                except Exception:  # noqa: BLE001 - processes come and go
                    continue
            if self._mark_wanted:  # this sweep's readings are the mark
                self._at_mark = {pid: rec[4] for pid, rec in self._procs.items()}
                self._own_at_mark = time.thread_time()
                self.mark_time, self._mark_wanted = time.time(), False
            self._sweeps += 1
            self.peak_rss = max(self.peak_rss, total)
            if time.time() - last_plasma > 1.0:
                last_plasma = time.time()
                used = _plasma_used()
                self.plasma_timeline.append(round(used / 2**20))
                self.peak_plasma = max(self.peak_plasma, used)
            self.own_cpu_s = time.thread_time()  # this sampler, counted in the driver's CPU
            self._stop.wait(self.interval)

    def mark(self) -> None:
        """Take the next sweep's CPU readings as a mark (e.g. at the first batch)."""
        self._mark_wanted = True

    def cpu_by_role(self, since_mark: bool = False) -> dict[str, float]:
        """CPU seconds per role while sampling (or from the mark on, ``since_mark``; {} when
        there is none): from the first sample (or the mark) for the processes already running,
        from birth for those started since, to each process's last sample (the last ~0.25 s of
        a process that exits is missed). The sampler's own thread is a role of its own."""
        if since_mark and self._at_mark is None:
            return {}
        start = self._at_mark if since_mark else {}
        out: dict[str, float] = {}
        for pid, (role, _, _, first, last) in self._procs.items():
            out[role] = out.get(role, 0.0) + last - start.get(pid, first)
        own = self.own_cpu_s - (self._own_at_mark if since_mark else 0.0)
        out["consumer_driver"] = out.get("consumer_driver", 0.0) - own
        out["sampler_thread"] = own
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def born_between(self, start: float, end: float) -> list[dict]:
        """The processes started between two ``time.time()`` instants (e.g. an execution's start
        and its first batch), oldest first, with each one's CPU seconds while sampled."""
        rows = [
            {
                "role": role,
                "process": title,
                "born_s": round(born - start, 2),
                "cpu_s": round(last - first, 1),
            }
            for role, title, born, first, last in self._procs.values()
            if start <= born <= end
        ]
        return sorted(rows, key=lambda r: r["born_s"])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _plasma_used() -> int:
    try:
        import ray
        from ray._private.internal_api import memory_summary

        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        m = re.search(r"Plasma memory usage (\d+) MiB", text)
        return int(m.group(1)) * 2**20 if m else 0
    except Exception:  # noqa: BLE001
        return 0


def ray_epoch(td, epoch: int, batch_size: int, total: int) -> dict:
    """Whole-epoch rate (includes the per-epoch actor start: Ray Data recreates the pool for every
    execution) and the steady rate between 20% and 90% of the epoch's images, where the output
    queue is in equilibrium (no start-up, no final drain)."""
    td.set_epoch(epoch)
    t0 = time.perf_counter()
    n, marks = 0, {}
    for batch in td.dataset.iter_torch_batches(batch_size=batch_size):
        n += len(batch["global_0"])
        for frac in (0.2, 0.9):
            if frac not in marks and n >= frac * total:
                marks[frac] = (n, time.perf_counter())
    end = time.perf_counter()
    (n20, t20), (n90, t90) = marks[0.2], marks[0.9]
    return {
        "images": n,
        "wall_s": round(end - t0, 2),
        "rate_incl_startup": round(n / (end - t0), 1),
        "rate_steady": round((n90 - n20) / max(1e-9, t90 - t20), 1),
    }


def ray_stream(
    td, epochs: int, batch_size: int, per_epoch: int, on_first_batch=None
) -> tuple[dict, tuple[float, float]]:
    """What the training loop does: one execution streams ``epochs`` epochs back to back (the
    actor pool starts once). Whole-run rate, start-up included, and the rate from the first
    batch on (what a longer run tends to: the start-up is paid once per execution); and the
    start-up as two ``time.time()`` instants (start, first batch)."""
    t0, wall0 = time.perf_counter(), time.time()
    n, epoch, first = 0, 0, None
    while epoch < epochs:  # one execution per window of data.stream_rows rows (one here)
        end = td.set_epoch(epoch, until=epochs, rows_per_epoch=per_epoch)
        for b in td.dataset.iter_torch_batches(batch_size=batch_size):
            if first is None:
                first = (time.perf_counter(), len(b["global_0"]))
                first_wall = time.time()
                if on_first_batch is not None:
                    on_first_batch()
            n += len(b["global_0"])
        epoch = end
    wall = time.perf_counter() - t0
    return {
        "epochs": epochs,
        "images": n,
        "wall_s": round(wall, 2),
        "rate_incl_startup": round(n / wall, 1),
        "first_batch_s": round(first[0] - t0, 2),
        "images_after_first_batch": n - first[1],
        "rate_after_first_batch": round((n - first[1]) / (t0 + wall - first[0]), 1),
    }, (wall0, first_wall)


def cpu_share(mem: ProcessSampler, end: float, stream: dict, standalone: float, procs: int) -> dict:
    """Where the CPUs went from the first batch on: each role's share of all the machine's CPU
    time, and how many images the crop processes made per CPU second of theirs against one
    standalone process. Their product is the ratio after the first batch (when the standalone
    processes each had a core): a share below 1 is CPU the consumer and Ray's own processes took,
    an efficiency below 1 is the crop stage's own overhead (copies, serialisation)."""
    by_role = mem.cpu_by_role(since_mark=True)
    if not by_role or mem.mark_time is None:
        return {}
    cpu_total = (os.cpu_count() or 1) * max(1e-9, end - mem.mark_time)
    images = stream["images_after_first_batch"]
    crop_s = by_role.get("crop_actors", 0.0)
    share = {k: round(v / cpu_total, 3) for k, v in by_role.items()}
    # CPU time no process of this run used: idle, or taken by the machine's other work
    share["not_used_by_this_run"] = round(1 - sum(by_role.values()) / cpu_total, 3)
    return {
        "cpu_s_by_role_after_first_batch": by_role,
        "cpu_share_after_first_batch": share,
        "crop_images_per_cpu_s_vs_one_standalone_process": round(
            images / max(1e-9, crop_s) / (standalone / procs), 3
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--stream-epochs",
        type=int,
        default=3,
        help="epochs of the one-execution stream (what training runs)",
    )
    ap.add_argument(
        "--stream-only",
        action="store_true",
        help="only the large corpus, only the whole-run stream (no per-epoch runs)",
    )
    ap.add_argument(
        "--map-batch-size",
        type=int,
        default=None,
        help="images per decode+crop call (default: data.map_batch_size's)",
    )
    ap.add_argument(
        "--tasks-in-flight",
        type=int,
        default=None,
        help="calls queued on each crop actor (DataContext."
        "max_tasks_in_flight_per_actor; Ray's default is 2)",
    )
    ap.add_argument(
        "--object-store-mib",
        type=float,
        default=None,
        help="cap Ray Data's object store use (plan.object_store_bytes)",
    )
    ap.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "dino-ray-bench-jpegs"))
    args = ap.parse_args()

    big_n = args.images * args.scale
    root = make_jpegs(args.corpus + f"-{big_n}", big_n)
    files = sorted(str(p) for p in Path(root).rglob("*.jpg"))

    import ray

    # the consumer stands for a train worker, which has torch loaded before it asks for data:
    # left to iter_torch_batches, the import took 2.6 s of the driver inside the first batch
    import torch  # noqa: F401

    from pipeline.config import AugmentConfig, DataConfig
    from pipeline.data.dataset import build_train_dataset
    from pipeline.data.resources import cluster_cpus, plan_data_resources
    from pipeline.ray_runtime import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.tasks_in_flight:
        ray.data.DataContext.get_current().max_tasks_in_flight_per_actor = args.tasks_in_flight
    # no Train in this benchmark: every CPU but the headroom may go to data
    plan = plan_data_resources(
        cluster_cpus(),
        0,
        1,
        num_actors=args.actors,
        cpus_per_actor=1,
        object_store_bytes=(args.object_store_mib * 2**20 if args.object_store_mib else None),
    )
    results = {}
    sizes = [("large", big_n)] if args.stream_only else [("small", args.images), ("large", big_n)]
    for label, n in sizes:
        # the reference is measured right before and right after each Ray run, so that both see
        # the same machine load (a few seconds of it varied by +-10% across runs)
        reference = [standalone_rate(files[: min(n, args.images)], plan.num_actors)]
        cfg = DataConfig(
            path=str(root),
            num_actors=plan.num_actors,
            limit=n,
            map_batch_size=(
                args.map_batch_size or DataConfig.model_fields["map_batch_size"].default
            ),
        )
        td = build_train_dataset(cfg, AugmentConfig(), seed=0, plan=plan)
        with ProcessSampler() as mem:
            epochs = (
                [] if args.stream_only else [ray_epoch(td, e, args.batch_size, n) for e in range(2)]
            )
            stream, startup = ray_stream(
                td, args.stream_epochs, args.batch_size, n, on_first_batch=mem.mark
            )
            after_end = time.time()
        reference.append(standalone_rate(files[: min(n, args.images)], plan.num_actors))
        standalone = sum(reference) / len(reference)
        per_epoch = {}
        if epochs:
            steady = max(e["rate_steady"] for e in epochs)
            whole = max(e["rate_incl_startup"] for e in epochs)
            per_epoch = {
                "ratio_steady_vs_standalone": round(steady / standalone, 3),
                "ratio_whole_epoch_vs_standalone": round(whole / standalone, 3),
            }
        results[label] = {
            "images": n,
            "map_batch_size": cfg.map_batch_size,
            "standalone_images_per_s": round(standalone, 1),
            "standalone_before_after": [round(r, 1) for r in reference],
            "epochs": epochs,
            "stream": stream,
            **per_epoch,
            "ratio_stream_whole_run_vs_standalone": round(
                stream["rate_incl_startup"] / standalone, 3
            ),
            "ratio_stream_after_first_batch_vs_standalone": round(
                stream["rate_after_first_batch"] / standalone, 3
            ),
            "peak_ray_rss_mib": round(mem.peak_rss / 2**20),
            "peak_object_store_mib": round(mem.peak_plasma / 2**20),
            "object_store_mib_per_s": mem.plasma_timeline,
            "cpu_s_by_role": mem.cpu_by_role(),
            **cpu_share(mem, after_end, stream, standalone, plan.num_actors),
            # the start-up: each process the execution started before its first
            # batch (a new Ray worker imports Ray Data before its first row)
            "started_before_first_batch": mem.born_between(*startup),
            "skips": td.skip_counts(),
            "loadavg_after": os.getloadavg(),
        }
    ray.shutdown()
    print(
        json.dumps(
            {
                "benchmark": (
                    "Ray Data ingest (decode + 2x224 + 8x96 multi-crop) into iter_torch_batches"
                ),
                "command": command_line(),
                "machine": machine(),
                "resource_plan": plan.as_dict(),
                "standalone_processes": plan.num_actors,
                "ray": results,
                **(
                    {}
                    if args.stream_only
                    else {
                        "memory_large_vs_small_rss": round(
                            results["large"]["peak_ray_rss_mib"]
                            / max(1, results["small"]["peak_ray_rss_mib"]),
                            2,
                        ),
                        "memory_large_vs_small_object_store": round(
                            results["large"]["peak_object_store_mib"]
                            / max(1, results["small"]["peak_object_store_mib"]),
                            2,
                        ),
                    }
                ),
                "target_ratio": 0.9,
            }
        )
    )


if __name__ == "__main__":
    main()
