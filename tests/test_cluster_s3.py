"""The pipeline on a real multi-node Ray cluster with object storage, as a cluster user runs it.

One cluster for the module (``tests/live_cluster.py``): a head (``head: 1``), a data node
(``data: 2``) and a train node (``train: 2``), separate ``ray start`` processes on 127.0.0.1 that
share no path the pipeline uses; a real S3 server (moto) holds the corpus as Parquet, the run's
checkpoints and the MLflow server's artifacts. Every job goes through ``dino-ray submit``; this
is also the test session's only Ray cluster for submissions (tests/test_submit.py checks the
plan without one).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import pytest
from live_cluster import LocalCluster
from live_services import shared_mlflow_server, shared_s3_server
from polling import wait_for
from presets import tiny_config

from pipeline.checkpoints import CONFIG_FILE, META_FILE, STATE_FILE
from pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def s3():
    """The session's S3 server (``live_services.shared_s3_server``; the shared MLflow server keeps
    its artifacts there too)."""
    server = shared_s3_server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # this process reads and writes the bucket too
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def _mlflow_s3_starting(s3):
    """The session's MLflow server (artifacts in the bucket) starts on a thread of its own while
    the cluster comes up, unless an earlier module started it already."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(shared_mlflow_server)


@pytest.fixture(scope="module")
def cluster(s3, _mlflow_s3_starting):
    c = LocalCluster.start(env=s3.env, head_cpus=1)
    try:
        c.add_nodes([("data", 2, None), ("train", 2, None)])
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture(scope="module")
def mlflow_s3(_mlflow_s3_starting):
    return _mlflow_s3_starting.result()


@pytest.fixture(scope="module")
def corpus(s3, digits_dir):
    """The digits as Parquet shards in the bucket (what `data to-parquet` writes)."""
    uri = f"s3://{s3.bucket}/digits"
    assert main(["data", "to-parquet", str(digits_dir), uri]) == 0
    assert any(k.endswith(".parquet") for k in s3.keys("digits/"))
    return uri


def _job_config(tmp_path, corpus, name, **updates):
    values = dict(
        train__num_workers=2,
        data__limit=160,
        train__max_steps_per_epoch=2,
        train__epochs=1,
        eval__every_epochs=1,
        eval__limit=120,
    )
    cfg = tiny_config(corpus, "s3://dino/runs", name, **{**values, **updates})
    path = tmp_path / f"{name}.yaml"  # outside the repository: shipped inline as overrides
    path.write_text(cfg.to_yaml())
    return path


def _submit(cluster, monkeypatch, capsys, verb, *args, sid=None):
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    sid = sid or f"{verb}-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    rc = main(["submit", verb, "--address", cluster.address, "--submission-id", sid, *args])
    out = capsys.readouterr()
    text = out.out + out.err
    if os.environ.get("DINO_RAY_TEST_JOB_LOGS"):  # keep each job's output for a post-mortem
        with open(os.path.join(os.environ["DINO_RAY_TEST_JOB_LOGS"], f"{sid}.log"), "w") as f:
            f.write(text)
    return rc, text, sid, time.monotonic() - t0


def _driver_node(cluster, sid):
    return cluster.get(f"/api/jobs/{sid}")["driver_node_id"]


def _checkpoints(s3, name):
    """The whole checkpoints of run ``name`` in the bucket, oldest first: Ray Train uploads a
    checkpoint file by file, and one with only some of its files is not there yet (a node killed
    at the first key of its first checkpoint left nothing to resume from, and CI saw a fresh
    start where the test expected a resume)."""
    files: dict[str, set[str]] = {}
    for key in s3.keys(f"runs/{name}/"):
        if m := re.search(r"(checkpoint_step_\d+)/([^/]+)$", key):
            files.setdefault(m.group(1), set()).add(m.group(2))
    whole = {STATE_FILE, CONFIG_FILE, META_FILE}  # an S3 object appears only once uploaded
    return sorted(c for c, names in files.items() if whole <= names)


def _job_logs(cluster, sid) -> str:
    logs = cluster.get(f"/api/jobs/{sid}/logs")["logs"]
    if os.environ.get("DINO_RAY_TEST_JOB_LOGS"):
        with open(os.path.join(os.environ["DINO_RAY_TEST_JOB_LOGS"], f"{sid}.log"), "w") as f:
            f.write(logs)
    return logs


def _job_status(cluster, sid) -> str:
    return cluster.get(f"/api/jobs/{sid}")["status"]


def _newest_step(s3, name) -> int:
    steps = [int(c.rsplit("_", 1)[1]) for c in _checkpoints(s3, name)]
    return max(steps, default=0)


def _job_id(cluster, sid) -> str:
    return cluster.get(f"/api/jobs/{sid}")["job_id"]


def _submit_and_ctrl_c(cluster, s3, name, *args) -> tuple[str, str, float]:
    """`dino-ray submit train ...` in a terminal of its own; Ctrl-C once run ``name`` has its first
    checkpoint in the bucket. Returns the job id, the command's output and the time of the
    Ctrl-C."""
    import signal
    import subprocess
    import sys
    import threading

    sid = f"train-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "RAY_AUTH_TOKEN": cluster.token}
    # as in a terminal, Ctrl-C raises KeyboardInterrupt: a test run started in the background
    # (`make test &`, nohup, some CI runners) hands its children SIGINT ignored, and Python keeps
    # it ignored (the job then ran to its end, exit 0, in every clean-clone run started that way)
    terminal = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('pipeline.cli', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            terminal,
            "submit",
            "train",
            "--address",
            cluster.address,
            "--submission-id",
            sid,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        errors="replace",
    )  # a stray byte must not kill the reader thread (the pipe then fills)
    # read the output as it comes, as a terminal does: a pipe nobody reads fills up (64 KB, a
    # few epochs of the job's log), the command blocks in a write, and Ctrl-C waits with it
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(
            lambda: _newest_step(s3, name) >= 2 or proc.poll() is not None,
            "first checkpoint",
            limit_s=600,
            poll_s=0.5,
        )
        assert proc.poll() is None, "".join(lines)[-4000:]
        t_kill = time.monotonic()
        proc.send_signal(signal.SIGINT)  # Ctrl-C in the terminal that submitted the job
        proc.wait(timeout=180)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode == 130, out[-4000:]
    return sid, out, t_kill


def test_submitted_run_stops_on_ctrl_c_resumes_from_s3_evaluates_registers_and_pulls(
    cluster, s3, corpus, mlflow_s3, tmp_path, monkeypatch, capsys
):
    """One tracked run driven through `dino-ray submit`, as a cluster user does: Ctrl-C on
    `submit` stops the job on the cluster (its driver gets SIGTERM: the workers checkpoint and
    stop); submitting the same command again resumes from S3 into the same MLflow run; then
    `submit evaluate` and `submit register` on the S3 checkpoint, and `models pull`."""
    # the Ctrl-C lands a few steps after the first checkpoint, long before the end: jobs of 8 and
    # 12 epochs (1.6 s each) ran to their end before the stop landed; 30 epochs, evaluated every
    # 10 (the k-NN is still logged)
    epochs = 30
    track = [
        "tracking.enabled=true",
        f"tracking.tracking_uri={mlflow_s3.uri}",
        "tracking.experiment=cluster",
    ]
    cfg = _job_config(
        tmp_path, corpus, "s3run", train__epochs=epochs, eval__every_epochs=10, eval__at_end=True
    )
    command = ["--config", str(cfg), *track]

    # 1. train, checkpoints in the bucket; Ctrl-C stops the job
    sid, out, t_kill = _submit_and_ctrl_c(cluster, s3, "s3run", *command)
    assert f"stopping job {sid}" in out
    status = wait_for(
        lambda: _job_status(cluster, sid),
        "stopped job",
        lambda st: st in ("STOPPED", "FAILED", "SUCCEEDED"),
        120,
        0.5,
    )
    assert status == "STOPPED"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_s3.uri)
    experiment = client.get_experiment_by_name("cluster").experiment_id
    stopped = client.search_runs([experiment], "attributes.run_name = 's3run'")
    # the driver had --stop-grace-s to stop the workers with a checkpoint and close its run (with
    # Ray's own 3 s it was killed first on a loaded machine, and the run stayed RUNNING)
    assert [(r.info.status, r.data.tags.get("stopped_by")) for r in stopped] == [
        ("KILLED", "SIGTERM")
    ]
    step_at_kill = _newest_step(s3, "s3run")
    assert step_at_kill < 2 * epochs, "the stopped job ran to its end: nothing left to resume"

    # 2. the same command again resumes from S3 and finishes; work ran where its role says
    rc, out, sid, _ = _submit(cluster, monkeypatch, capsys, "train", *command)
    assert rc == 0, out[-5000:] + cluster.tail()
    assert f"resuming from s3://dino/runs/s3run/checkpoint_step_{step_at_kill:08d}" in out
    summary, _ = json.JSONDecoder().raw_decode(out[out.rindex('{\n "checkpoint_path"') :])
    assert summary["metrics"]["step"] == 2 * epochs
    assert summary["checkpoint_path"].startswith("s3://")
    assert _newest_step(s3, "s3run") == 2 * epochs
    print(
        f"job stopped (Ctrl-C on submit) at step {step_at_kill}: resubmitted run done "
        f"{time.monotonic() - t_kill:.1f} s after the Ctrl-C"
    )
    job = _job_id(cluster, sid)
    actors = [a for a in cluster.state("actors") if a["job_id"] == job]
    crop = [a for a in actors if "MultiCropStage" in a["class_name"]]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert crop and {a["node_id"] for a in crop} <= cluster.node_ids_with("data")
    assert len(workers) == 2 and {a["node_id"] for a in workers} <= cluster.node_ids_with("train")
    assert _driver_node(cluster, sid) in cluster.node_ids_with("head")
    runs = client.search_runs([experiment], "attributes.run_name = 's3run'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run
    assert '"mlflow_run_id"' in out  # the job's own output, streamed back
    # the in-training k-NN (a subset) and the end-of-run one (the whole split), named apart
    assert {"subset_knn_top1", "knn_top1", "knn_val_size"} <= set(runs[0].data.metrics)
    assert summary["headline"].startswith("k-NN top-1 on the validation split (")
    ckpt = summary["checkpoint_path"]

    # register that run's teacher by its MLflow run name (what `submit register --run-name` runs)
    assert (
        main(
            [
                "register",
                "--run-name",
                "s3run",
                "--tracking-uri",
                mlflow_s3.uri,
                "--name",
                "run-teacher",
                "tracking.experiment=cluster",
            ]
        )
        == 0
    )
    version = MlflowClient(
        tracking_uri=mlflow_s3.uri, registry_uri=mlflow_s3.uri
    ).get_model_version_by_alias("run-teacher", "champion")
    assert version.run_id == runs[0].info.run_id
    assert float(version.tags["knn_top1"]) == pytest.approx(
        runs[0].data.metrics["knn_top1"], abs=1e-4
    )

    # 3. evaluate and register the S3 checkpoint on the cluster; pull the registered teacher
    stored = set(s3.keys("mlflow/"))  # the session's MLflow server shares the bucket
    rc, out, _, _ = _submit(cluster, monkeypatch, capsys, "evaluate", ckpt, "--no-random-init")
    assert rc == 0, out[-5000:]
    assert "knn_top1" in out
    rc, out, _, _ = _submit(
        cluster,
        monkeypatch,
        capsys,
        "register",
        "--checkpoint",
        ckpt,
        "--tracking-uri",
        mlflow_s3.uri,
        "--name",
        "s3-teacher",
    )
    assert rc == 0, out[-5000:]
    assert set(s3.keys("mlflow/")) - stored  # the registered model's artifacts went to S3
    dst = tmp_path / "pulled"
    assert (
        main(["models", "--tracking-uri", mlflow_s3.uri, "pull", "models:/s3-teacher/1", str(dst)])
        == 0
    )
    import torch
    from safetensors.torch import load_file

    from pipeline.checkpoints import load_teacher_backbone

    backbone, _ = load_teacher_backbone(ckpt)  # downloaded from the bucket
    pulled = load_file(next(dst.rglob("backbone.safetensors")))
    expected = backbone.state_dict()
    assert pulled.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(pulled[key], value, msg=key)


def test_local_storage_path_on_a_multi_node_cluster_fails_fast(
    cluster, corpus, tmp_path, monkeypatch, capsys
):
    """A local train.storage_path on a multi-node cluster fails in the job's driver before any
    worker starts; like every failing job, `submit` then exits 1 and prints its FAILED status
    (on stderr: the job's own output goes to stdout)."""
    cfg = _job_config(tmp_path, corpus, "localrun")
    rc, out, sid, wall = _submit(
        cluster, monkeypatch, capsys, "train", "--config", str(cfg), "train.storage_path=./runs"
    )
    assert rc == 1
    assert f"job {sid}: FAILED" in out  # submit_and_follow's status line (stderr)
    assert "train.storage_path='./runs' is a local path" in out
    assert "TorchTrainer" not in out and "RayTrainWorker" not in out  # nothing was started
    print(f"fail-fast submission took {wall:.1f} s")


def test_unreadable_corpus_fails_with_counts_and_examples(
    cluster, s3, tmp_path, monkeypatch, capsys
):
    import boto3

    bucket = boto3.client("s3", **s3.client_kwargs())
    for i in range(40):  # an image export gone wrong: every file is garbage
        bucket.put_object(
            Bucket=s3.bucket, Key=f"broken/cls{i % 2}/img{i:03d}.jpg", Body=b"not a jpeg " * 20
        )
    cfg = _job_config(
        tmp_path,
        f"s3://{s3.bucket}/broken",
        "broken",
        data__limit=None,
        eval__every_epochs=0,
        train__num_workers=1,
    )  # one worker fails as well
    rc, out, _, _ = _submit(cluster, monkeypatch, capsys, "train", "--config", str(cfg))
    assert rc == 1, out[-4000:]
    assert "DataQualityError" in out and "images skipped" in out
    assert "broken/cls" in out  # example paths are named
    assert "restarting from the newest checkpoint" not in out  # deterministic: not retried


def _run_until_first_checkpoint(
    cluster, s3, corpus, tmp_path, monkeypatch, capsys, name, epochs, **updates
):
    """Submit a run without waiting; return its job id and step once a checkpoint is in the
    bucket (the moment a fault is injected)."""
    # one worker: a node loss stops it as it stops two (the 2-worker restart after a worker
    # death: tests/test_train_ray.py), and each restart starts one process less
    cfg = _job_config(
        tmp_path,
        corpus,
        name,
        train__epochs=epochs,
        train__max_failures=3,
        eval__every_epochs=0,
        train__num_workers=1,
        **updates,
    )
    rc, out, sid, _ = _submit(
        cluster, monkeypatch, capsys, "train", "--config", str(cfg), "--no-wait"
    )
    assert rc == 0, out
    wait_for(
        lambda: _newest_step(s3, name) >= 2 or _job_status(cluster, sid) in ("FAILED", "STOPPED"),
        "first checkpoint",
        limit_s=600,
        poll_s=0.5,
    )
    assert _job_status(cluster, sid) == "RUNNING"
    return sid, _newest_step(s3, name)


def _crop_actors(cluster, job: str, node_ids: set[str], *, alive: bool = False) -> list[dict]:
    """The job's crop-stage actors placed on ``node_ids`` (only those alive now: ``alive``)."""
    return [
        a
        for a in cluster.state("actors")
        if a["job_id"] == job
        and "MultiCropStage" in a["class_name"]
        and a["node_id"] in node_ids
        and (a["state"] == "ALIVE" or not alive)
    ]


def _wait_for_end(cluster, sid) -> str:
    return wait_for(
        lambda: _job_status(cluster, sid),
        "end of the job",
        lambda st: st in ("SUCCEEDED", "FAILED", "STOPPED"),
        900,
        0.5,
    )


def test_train_and_data_nodes_lost_mid_run_the_job_resumes_from_s3_and_finishes(
    cluster, s3, corpus, tmp_path, monkeypatch, capsys
):
    """One job loses a node twice, as on an autoscaled cluster: the train node's raylet dies
    after the first checkpoint and an autoscaler (here: the test) brings up another train node:
    the job resumes from S3, losing under an epoch; once the resumed run has checkpointed, the
    data node, holding the stream's crop actors, dies and another returns 5 s later: the crop
    actors come back on it and the job finishes without a second training restart."""
    epochs = 8  # room for both faults before the end, however late a loaded poll sees a checkpoint
    # one Ray Data execution per epoch (data.stream_rows at its minimum): each epoch starts crop
    # actors again, so the data node can be caught holding live ones (one execution for the
    # whole run crops its few rows early and its actors are gone before the node dies)
    sid, step_at_kill = _run_until_first_checkpoint(
        cluster, s3, corpus, tmp_path, monkeypatch, capsys, "nodefault", epochs, data__stream_rows=1
    )
    t_kill = time.monotonic()
    victim = next(n for n in cluster.nodes if n.startswith("train"))
    cluster.kill_node(victim)
    step_at_train_loss = _newest_step(s3, "nodefault")  # nothing after this is the dead node's
    cluster.add_node("train", 2)  # what the autoscaler does for the pending workers
    wait_for(
        lambda: (
            _newest_step(s3, "nodefault") > step_at_train_loss
            or _job_status(cluster, sid) != "RUNNING"
        ),
        "a checkpoint of the resumed run",
        limit_s=600,
        poll_s=0.5,
    )
    assert _job_status(cluster, sid) == "RUNNING", _job_logs(cluster, sid)[-6000:]
    step_at_data_loss = _newest_step(s3, "nodefault")
    assert step_at_data_loss < 2 * epochs, "the run ended before the data node was lost"
    recovered_s = time.monotonic() - t_kill
    # the data node holds the stream's crop actors when it dies (else its loss tests nothing)
    job = _job_id(cluster, sid)
    old_data = cluster.node_ids_with("data")
    assert len(old_data) == 1
    wait_for(
        lambda: _crop_actors(cluster, job, old_data, alive=True),
        "crop actors alive on the data node",
        limit_s=300,
        poll_s=0.1,
    )
    assert _job_status(cluster, sid) == "RUNNING"
    t_data = time.monotonic()
    victim = next(n for n in cluster.nodes if n.startswith("data"))
    cluster.kill_node(victim)
    time.sleep(5)  # the stream is without a data node for a while
    cluster.add_node("data", 2)
    new_data = cluster.node_ids_with("data") - old_data
    assert len(new_data) == 1
    status = _wait_for_end(cluster, sid)
    logs = _job_logs(cluster, sid)
    assert status == "SUCCEEDED", logs[-6000:]
    # one training restart, the train node's: the data node's loss did not fail the attempt, the
    # stream went on with crop actors on the new data node
    assert set(re.findall(r"training attempt (\d+) failed", logs)) == {"1"}, logs[-6000:]
    assert "restarting from the newest checkpoint" in logs
    assert _crop_actors(cluster, job, new_data)
    resumed = [
        int(x)
        for x in re.findall(
            r"resuming from s3://dino/runs/nodefault/"
            r"checkpoint_step_(\d+)",
            logs,
        )
    ]
    # the first resume is the train node's: nothing checkpointed before the kill was lost, only
    # the epoch in flight
    assert resumed and resumed[0] >= step_at_kill
    assert len(set(resumed)) == 1  # a single resume: the data node's loss needed none
    assert _newest_step(s3, "nodefault") == 2 * epochs
    print(
        f"train node lost at step {step_at_kill}: resumed from step {min(resumed)}, "
        f"checkpointing again {recovered_s:.1f} s after the kill; data node lost at step "
        f"{step_at_data_loss}: job finished {time.monotonic() - t_data:.1f} s after that kill"
    )


def test_distillation_submitted_to_the_cluster_survives_a_worker_death(
    cluster, s3, corpus, mlflow_s3, tmp_path, monkeypatch, capsys
):
    """`dino-ray submit distill`: a tiny ViT registered on the MLflow server (artifacts in the
    bucket) distilled into a `test_resnet` student by two Train workers on the train node; one
    worker process is SIGKILLed once the first checkpoint is in the bucket and the job resumes
    from it. Every checkpoint records the digest of the teacher the workers held, equal to the
    registered weights' (the frozen teacher never moved); the student's features approach the
    teacher's; the student's run and registry version name the teacher's version."""
    import signal

    import torch
    from mlflow import MlflowClient

    from dino_model.backbone import build_backbone
    from pipeline.checkpoints import load_teacher_backbone, read_meta
    from pipeline.distill_run import LINEAGE_PARAM
    from pipeline.registry import register_teacher
    from pipeline.train.distill_teacher import DIGEST_KEY, weights_digest

    # random weights of another seed stand for a trained teacher: the student learns them as well
    torch.manual_seed(7)
    teacher = build_backbone("test_vit", img_size=32, patch_size=4).eval()
    version = register_teacher(
        teacher,
        tiny_config(corpus, "s3://dino/runs", "teacher"),
        tracking_uri=mlflow_s3.uri,
        name="tiny-teacher",
        aliases=["prod"],
    )
    name, epochs = "distil", 4
    cfg = _job_config(
        tmp_path,
        corpus,
        name,
        model__arch="test_resnet",
        model__cifar_stem=True,
        distill__teacher="models:/tiny-teacher@prod",
        train__epochs=epochs,
        train__max_steps_per_epoch=2,
        train__max_failures=1,
        train__keep_checkpoints=10,  # all of them: the digest before and after the death
        data__limit=320,
        eval__every_epochs=0,
        eval__at_end=True,
        eval__limit=None,
        tracking__enabled=True,
        tracking__tracking_uri=mlflow_s3.uri,
        tracking__experiment="cluster-distill",
    )
    rc, out, sid, _ = _submit(
        cluster, monkeypatch, capsys, "distill", "--config", str(cfg), "--no-wait"
    )
    assert rc == 0, out
    wait_for(
        lambda: (
            _newest_step(s3, name) >= 2 or _job_status(cluster, sid) not in ("PENDING", "RUNNING")
        ),
        "first checkpoint",
        limit_s=600,
        poll_s=0.5,
    )
    assert _job_status(cluster, sid) == "RUNNING", _job_logs(cluster, sid)[-6000:]
    step_at_kill = _newest_step(s3, name)
    job = _job_id(cluster, sid)
    workers = [
        a
        for a in cluster.state("actors")
        if a["job_id"] == job and a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"
    ]
    assert len(workers) == 2, workers
    os.kill(int(workers[0]["pid"]), signal.SIGKILL)  # a worker process dies, its node lives
    status = _wait_for_end(cluster, sid)
    logs = _job_logs(cluster, sid)
    assert status == "SUCCEEDED", logs[-6000:]
    assert set(re.findall(r"training attempt (\d+) failed", logs)) == {"1"}, logs[-6000:]
    resumed = re.findall(rf"resuming from s3://dino/runs/{name}/checkpoint_step_(\d+)", logs)
    assert resumed and int(resumed[0]) >= step_at_kill, logs[-6000:]
    assert _newest_step(s3, name) == 2 * epochs

    # the frozen teacher: at every checkpoint, before and after the death, the registered weights
    shipped = weights_digest(teacher.state_dict())
    checkpoints = _checkpoints(s3, name)
    assert len(checkpoints) >= 2
    for c in checkpoints:
        assert read_meta(f"s3://dino/runs/{name}/{c}")[DIGEST_KEY] == shipped, c

    # the student's backbone is where evaluation reads a teacher: the checkpoint's teacher slot
    backbone, _ = load_teacher_backbone(f"s3://dino/runs/{name}/{checkpoints[-1]}")
    assert type(backbone).__name__ == "ResNet"

    # the student: its figures, and its run and version name the teacher's version
    client = MlflowClient(tracking_uri=mlflow_s3.uri, registry_uri=mlflow_s3.uri)
    experiment = client.get_experiment_by_name("cluster-distill").experiment_id
    (run,) = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    m = run.data.metrics
    # the student moved toward its teacher, through the restart (a random teacher's features
    # need not beat a random ResNet's on k-NN: tests/test_distill_ray.py checks that on a run
    # of its own); the end-of-run figures are there
    cos = [x.value for x in client.get_metric_history(run.info.run_id, "epoch_distill_cls_cos")]
    assert len(cos) >= epochs and cos[-1] > cos[0] + 0.1, cos
    assert {"knn_top1", "knn_init_top1", "knn_pixels_top1"} <= set(m)
    assert "linear_top1" in m and "linear_init_top1" in m
    assert "epoch_distill_cls_loss" in m and m["epoch_distill_patch_loss"] == 0  # CNN: no patches
    lineage = f"models:/tiny-teacher/{version}"
    assert run.data.params[LINEAGE_PARAM] == lineage
    assert run.data.params[DIGEST_KEY] == shipped
    (student,) = client.search_model_versions("name = 'dino-student'")
    assert student.run_id == run.info.run_id
    assert student.tags[LINEAGE_PARAM] == lineage and student.tags["arch"] == "test_resnet"
