"""`dino-ray submit VERB --address http://HEAD:8265 [--config FILE] [overrides] [job flags]`.

Submits ``python jobs/VERB.py ...`` as a Ray job (``JobSubmissionClient``) with the repository as
its working directory (minus .venv, .git, runs, mlruns, *.db ...), streams the job's logs and
exits with the job's outcome: 0 on SUCCEEDED, 1 on FAILED, 2 on STOPPED; Ctrl-C stops the job,
whose driver then has ``--stop-grace-s`` seconds to checkpoint and close its MLflow run.

``--config`` inside the repository is passed as a relative path; a file elsewhere is inlined as
``section.field=value`` overrides (the job cannot see the submitting machine's files). Every other
argument after VERB that is not a submit option goes to the job unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.commands import UsageError

EXCLUDES = [
    ".venv",
    ".git",
    ".tools",
    ".whl",
    ".gl",
    "runs",
    "mlruns",
    "*.db",
    ".dino-ray",
    "demo_data",
    ".pytest_cache",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
]
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}
CONFIG_VERBS = {"train", "distill", "evaluate", "tune"}
# Ray SIGKILLs a stopped job's driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM, 3 s by default:
# too short for the workers' stop checkpoint and the MLflow run's KILLED status (a driver on a
# loaded 2-core test cluster needed more), so a stopped job lost its last steps and left its run
# RUNNING. The job supervisor reads the variable from the job's runtime_env.
STOP_GRACE_S = 120


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def job_verbs(root: Path | None = None) -> list[str]:
    root = root or repo_root()
    return sorted(p.stem for p in (root / "jobs").glob("*.py") if not p.stem.startswith("_"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("verb", help="job to run: jobs/VERB.py (train, evaluate, tune, register)")
    parser.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="--address URL [--config FILE] [section.field=value ...] "
        "[submit options] [job options]",
    )


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dino-ray submit VERB", add_help=False, allow_abbrev=False)
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard address, e.g. http://HEAD:8265 (or $RAY_ADDRESS)",
    )
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument(
        "--working-dir",
        help="directory shipped as the job's working dir (default: this repository)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable)",
    )
    p.add_argument("--submission-id", help="job id (default: generated)")
    p.add_argument("--no-wait", action="store_true", help="submit, print the id and return")
    p.add_argument(
        "--stop-grace-s",
        type=int,
        default=STOP_GRACE_S,
        help="seconds a stopped job's driver gets to checkpoint and close its MLflow "
        "run before Ray kills it (Ctrl-C here or `ray job stop`; default "
        f"{STOP_GRACE_S}, Ray's own 3)",
    )
    p.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        default=None,
        help="CPUs reserved for the driver process",
    )
    p.add_argument("--entrypoint-num-gpus", type=float, default=None)
    p.add_argument(
        "--entrypoint-resources",
        type=json.loads,
        default=None,
        help='custom resources for the driver, JSON, e.g. {"head": 1}',
    )
    p.add_argument("--help-submit", action="help", help="show the submit options")
    return p


def config_arguments(config: str | None, root: Path) -> list[str]:
    """``--config rel/path`` when the file lies under ``root``; else the file as overrides."""
    if not config:
        return []
    path = Path(config).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    try:
        return ["--config", path.relative_to(root.resolve()).as_posix()]
    except ValueError:
        raw = yaml.safe_load(path.read_text()) or {}
        return [
            f"{section}.{key}={json.dumps(value)}"
            for section, values in raw.items()
            for key, value in (values or {}).items()
        ]


def build_submission(verb: str, rest: list[str]) -> dict[str, Any]:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` plus ``address``/``wait``."""
    from pipeline.version import git_sha

    opts, job_args = submit_parser().parse_known_args(rest)
    root = Path(opts.working_dir).resolve() if opts.working_dir else repo_root()
    verbs = job_verbs(root)
    if verb not in verbs:
        raise ValueError(f"unknown job {verb!r}: {root}/jobs has {', '.join(verbs)}")
    if not opts.address:
        raise ValueError("--address is required (the Ray dashboard, e.g. http://HEAD:8265)")
    if verb in CONFIG_VERBS:  # fail on a typo here, not minutes later on the cluster
        from pipeline.config import DinoConfig

        overrides = [a for a in job_args if "=" in a and not a.startswith("-")]
        cfg = DinoConfig.load(opts.config, overrides)
        uri = cfg.tracking.tracking_uri
        if cfg.tracking.enabled and not uri.startswith(("http://", "https://", "databricks")):
            print(
                f"submit: note: tracking.tracking_uri={uri} is local to the cluster node that "
                "runs the job; use an MLflow server (http://...) to see the run from here",
                file=sys.stderr,
            )
    entry_args = config_arguments(opts.config, root) + job_args
    _refuse_secrets(entry_args, opts.env)
    # the job's runtime_env reaches its driver and every worker (ensure_ray() joins the cluster
    # without adding one): expected deprecation warnings stay out of the job's log
    env_vars = {
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_V2_ENABLED": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    sha = os.environ.get("DINO_RAY_GIT_SHA") or git_sha(root)
    if sha:
        env_vars["DINO_RAY_GIT_SHA"] = sha
    if opts.stop_grace_s < 0:
        raise ValueError(f"--stop-grace-s {opts.stop_grace_s}: expected seconds >= 0")
    env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = str(opts.stop_grace_s)
    for item in opts.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    kwargs: dict[str, Any] = {
        "entrypoint": shlex.join(["python", f"jobs/{verb}.py", *entry_args]),
        "runtime_env": {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars},
        "submission_id": opts.submission_id,
        "metadata": {"dino_ray_verb": verb, **({"git_sha": sha} if sha else {})},
    }
    for key in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_resources"):
        if getattr(opts, key) is not None:
            kwargs[key] = getattr(opts, key)
    return {
        "address": opts.address,
        "wait": not opts.no_wait,
        "submit": kwargs,
        "stop_grace_s": int(env_vars["RAY_JOB_STOP_WAIT_TIME_S"]),
    }


def _refuse_secrets(entry_args: list[str], env: list[str]) -> None:
    """A job's entrypoint and env vars are stored in its metadata, readable by anyone who can
    see the dashboard: a URI password or a signed-URL key there is refused, before submitting."""
    from pipeline.redact import is_secret_name, redact

    for where, items in (("argument", entry_args), ("--env", env)):
        for item in items:
            key = item.partition("=")[0] if where == "--env" else ""
            if redact(item) != item or (key and is_secret_name(key)):
                raise ValueError(
                    f"{where} {redact(item) if not key else key!r} carries a credential, which "
                    "the job's metadata would keep; give credentials to the cluster's nodes "
                    "(instance profile, service account or their environment), not to the job"
                )


def follow_job(client, job_id: str, poll_s: float = 2.0) -> str:
    """Print the job's log until the job ends; its terminal status. Ray's log stream can end
    while the job still runs or close abnormally (ray issues 51601, 57002) and can miss the last
    lines (46413): a stream that ends early is opened again (it starts at the top of the log:
    what was printed is skipped), and what no stream printed is read once the job has ended."""
    printed = 0

    def show(text: str) -> None:
        nonlocal printed
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            printed += len(text)

    async def stream() -> None:
        seen = 0
        async for chunk in client.tail_job_logs(job_id):
            new = chunk[max(0, printed - seen) :]
            seen += len(chunk)
            show(new)

    import aiohttp  # Ray's job client streams over it

    while True:
        try:
            asyncio.run(stream())
        except (RuntimeError, OSError, aiohttp.ClientError) as exc:  # an abnormal close
            print(
                f"submit: the log stream closed ({exc}); following the job again", file=sys.stderr
            )
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            show(client.get_job_logs(job_id)[printed:])
            return status
        time.sleep(poll_s)


def wait_for_terminal(client, job_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def auth_headers() -> dict[str, str]:
    """Ray token auth: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
    (as ``ray job submit`` finds it), unless RAY_AUTH_MODE=disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client_for(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers())


def submit_and_follow(
    address: str, submit: dict[str, Any], wait: bool = True, stop_grace_s: int = STOP_GRACE_S
) -> int:
    client = client_for(address)
    job_id = client.submit_job(**submit)
    print(f"submitted job {job_id} to {address}: {submit['entrypoint']}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    try:
        status = follow_job(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: stopping job {job_id} (its driver has up to {stop_grace_s} s to "
            "checkpoint; Ctrl-C again to stop waiting)",
            file=sys.stderr,
        )
        client.stop_job(job_id)
        try:
            status = wait_for_terminal(client, job_id, timeout=stop_grace_s + 30.0)
        except KeyboardInterrupt:
            status = "STOPPING (still, on the cluster)"
        print(f"job {job_id}: {status}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    print(
        f"job {job_id}: {status}" + (f" ({info.message})" if info.message else ""), file=sys.stderr
    )
    return TERMINAL.get(status, 1)


def run(args: argparse.Namespace) -> int:
    plan = build_submission(args.verb, list(args.rest))
    try:
        return submit_and_follow(
            plan["address"], plan["submit"], plan["wait"], plan["stop_grace_s"]
        )
    except ConnectionError as exc:  # the dashboard is down or the address is wrong
        raise UsageError(
            f"cannot reach the Ray dashboard at {plan['address']}: "
            f"{str(exc).strip().splitlines()[0]}"
        ) from exc
