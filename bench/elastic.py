"""Elastic training benchmark on a multi-node Ray cluster on this machine (CPU workers, tiny ViT):
the wall time a run loses when its cluster changes, elastic (``train.num_workers: [1, 2]``)
against a fixed size (2) whose restart waits for a replacement node.

    python bench/elastic.py [--replacement-delay 300] [--legs elastic,fixed] [--out FILE]

The cluster is the tests' ``LocalCluster`` (``tests/live_cluster.py``: separate ``ray start``
processes, a head, a data node and two one-CPU train nodes, each train node one worker's slot);
the corpus is the scikit-learn digits; each epoch is one step and ends with a checkpoint, so the
checkpoints' ``meta.json`` times are when the steps ended. Events, one after the other:

elastic run (``[1, 2]``)
  1. shrink: a train node killed; the run goes on with the survivor;
  2. grow: a train node joins; the group grows back to 2;
  3. preemption: Ray drains a train node with a deadline (``ray drain-node --reason
     DRAIN_NODE_REASON_PREEMPTION``, what a spot notice becomes), the workers checkpoint, the node
     is killed once their notice is in the job's log (or at the deadline);
fixed run (2)
  4. a train node killed, a replacement added ``--replacement-delay`` s later (the provisioning
     time of a new VM: minutes on a cloud, hours for scarce GPUs).

Per event: ``to_first_checkpoint_s`` (the event to the first checkpoint after it at the size
the run then has) and ``lost_s`` (the gap between the last checkpoint before the event and that
first one after it, less ``epoch_s``, the median time between two checkpoints at that size: the
time the run trained nothing). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the local cluster of the cluster tests
from polling import wait_for  # noqa: E402

from bench._corpus import command_line, machine  # noqa: E402

STEP_LIMIT_S = 600  # a step that does not come in this long: the benchmark fails


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replacement-delay", type=float, default=300.0, help="s (fixed leg)")
    ap.add_argument("--legs", default="elastic,fixed", help="which runs, comma-separated")
    ap.add_argument("--epochs", type=int, default=400, help="room for every event")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    from live_cluster import LocalCluster

    from pipeline.data.demo_corpus import build_digits_corpus

    work = Path(tempfile.mkdtemp(prefix="dino-ray-bench-elastic-"))
    digits = build_digits_corpus(work / "digits", size=32)
    t0 = time.monotonic()
    result = {"bench": "elastic", "machine": machine(), "command": command_line()}
    cluster = LocalCluster.start(head_cpus=1)
    try:
        cluster.add_nodes([("data", 2, None), ("train", 1, 1.0), ("train", 1, 1.0)])
        legs = args.legs.split(",")
        if "elastic" in legs:
            elastic = Run(cluster, work, digits, "elastic", [1, 2], args.epochs)
            result["elastic"] = {
                "shrink": elastic.shrink(),
                "grow": elastic.grow(),
                "preemption": elastic.preempt(),
            }
            elastic.stop()
            cluster.add_node("train", 1, 1.0)  # two train nodes again
        if "fixed" in legs:
            fixed = Run(cluster, work, digits, "fixed", 2, args.epochs)
            result["fixed"] = {"node_lost": fixed.wait_for_replacement(args.replacement_delay)}
            result["replacement_delay_s"] = args.replacement_delay
            fixed.stop()
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    if "elastic" in result and "fixed" in result:
        result["ratio_lost_fixed_over_elastic_shrink"] = _ratio(
            result["fixed"]["node_lost"]["lost_s"], result["elastic"]["shrink"]["lost_s"]
        )
    result["wall_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


class Run:
    """One training job on the cluster, its steps read from its checkpoints."""

    def __init__(self, cluster, work: Path, digits: Path, name: str, workers, epochs: int):
        from presets import tiny_config

        from pipeline.cli import main as cli

        self.cluster, self.runs, self.name = cluster, work / "runs", name
        cfg = tiny_config(
            digits,
            self.runs,
            name,
            train__num_workers=workers,
            train__max_steps_per_epoch=1,
            train__epochs=epochs,
            train__max_failures=-1,
            train__keep_checkpoints=epochs,
            train__elastic_resize_s=3,
            train__shared_filesystem=True,
            train__log_every_steps=100,
            eval__every_epochs=0,
        )
        path = work / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        self.sid = f"{name}-{uuid.uuid4().hex[:8]}"
        os.environ["RAY_AUTH_TOKEN"] = cluster.token
        rc = cli(
            ["submit", "train", "--address", cluster.address, "--submission-id", self.sid]
            + ["--config", str(path), "--no-wait"]
        )
        if rc != 0:
            raise RuntimeError(f"submitting {name} failed ({rc})")
        self.wait_steps(lambda s: len([x for x in s if x[1] == _max(workers)]) >= 4, "4 steps")

    def steps(self) -> list[tuple[float, int]]:
        """``(time the step ended, world size)`` of every step so far, in order."""
        out = []
        for meta in (self.runs / self.name).glob("checkpoint_*/meta.json"):
            try:
                m = json.loads(meta.read_text())
            except ValueError:  # being written
                continue
            out.append((meta.stat().st_mtime, int(m["metrics"]["world_size"]), m["images_seen"]))
        return [(t, w) for t, w, _ in sorted(out, key=lambda x: x[2])]

    def wait_steps(self, done, what: str) -> list[tuple[float, int]]:
        """The steps once ``done(steps)`` holds; RuntimeError with the job's log if the job
        ended before."""

        def read() -> list[tuple[float, int]]:
            status = self._status()
            if status not in ("PENDING", "RUNNING"):
                logs = self.cluster.get(f"/api/jobs/{self.sid}/logs")["logs"]
                raise RuntimeError(f"{self.name}: {status} before {what}:\n{logs[-4000:]}")
            return self.steps()

        return wait_for(read, f"{self.name}: {what}", done, limit_s=STEP_LIMIT_S, poll_s=0.5)

    def _status(self) -> str:
        return self.cluster.get(f"/api/jobs/{self.sid}")["status"]

    def event(self, t_event: float, size: int, settle: int = 3) -> dict:
        """The first step at ``size`` after ``t_event`` (wall clock) and ``settle`` more."""
        steps = self.wait_steps(
            lambda s: len([x for x in s if x[0] > t_event and x[1] == size]) > settle,
            f"{settle + 1} steps at size {size}",
        )
        before = [t for t, _ in steps if t <= t_event]
        after = [t for t, w in steps if t > t_event and w == size]
        epoch_s = statistics.median(b - a for a, b in zip(after, after[1:]))
        gap = after[0] - before[-1]
        return {
            "to_first_checkpoint_s": round(after[0] - t_event, 1),
            "gap_s": round(gap, 1),
            "epoch_s": round(epoch_s, 2),
            "lost_s": round(gap - epoch_s, 1),
            "size_after": size,
        }

    def shrink(self) -> dict:
        t = time.time()
        self.cluster.kill_node(_a_train_node(self.cluster))
        return self.event(t, 1)

    def grow(self) -> dict:
        known = self.cluster.node_ids_with("train")
        t = time.time()
        name = self.cluster.add_node("train", 1, 1.0)
        (node_id,) = self.cluster.node_ids_with("train") - known
        self.joined = (name, node_id)  # the node ``preempt`` drains
        return self.event(t, 2)

    def preempt(self, deadline_s: int = 60) -> dict:
        """Drain the train node ``grow`` added for preemption; kill it once the workers logged
        the notice (they checkpoint at once) or at the deadline."""
        name, node_id = self.joined
        t = time.time()
        subprocess.run(
            [
                str(ROOT / ".venv/bin/ray"),
                "drain-node",
                f"--address={self.cluster.gcs_address}",
                f"--node-id={node_id}",
                "--reason=DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message=bench: spot instance reclaimed",
                f"--deadline-remaining-seconds={deadline_s}",
            ],
            env=self.cluster.env,
            check=True,
            capture_output=True,
        )
        logs = ""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and "preemption notice" not in logs:
            time.sleep(0.5)
            logs = self.cluster.get(f"/api/jobs/{self.sid}/logs")["logs"]
        noticed = "preemption notice" in logs
        t_kill = time.time()
        self.cluster.kill_node(name)
        out = self.event(t_kill, 1)  # counted from the node's end, as the other events
        out.update(notice_seen=noticed, drain_to_kill_s=round(t_kill - t, 1))
        return out

    def wait_for_replacement(self, delay_s: float) -> dict:
        t = time.time()
        self.cluster.kill_node(_a_train_node(self.cluster))
        time.sleep(delay_s)  # the fixed-size run waits for a whole group
        self.cluster.add_node("train", 1, 1.0)
        return self.event(t, 2)

    def stop(self) -> None:
        subprocess.run(
            [str(ROOT / ".venv/bin/ray"), "job", "stop", "--address", self.cluster.address]
            + [self.sid],
            env=self.cluster.env,
            capture_output=True,
        )
        wait_for(
            self._status,
            f"{self.name} stopped",
            lambda s: s not in ("PENDING", "RUNNING"),
            limit_s=120,
            poll_s=1,
        )


def _a_train_node(cluster) -> str:
    return next(n for n in cluster.nodes if n.startswith("train"))


def _max(workers) -> int:
    return workers[1] if isinstance(workers, list) else workers


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


if __name__ == "__main__":
    sys.exit(main())
