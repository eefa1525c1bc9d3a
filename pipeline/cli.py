"""``dino-ray``: one console script, one sub-command module per verb (pipeline/commands/).

The verbs raise; this module is the one place that turns an error into an exit status and a
one-line message (``exit_status``, ``main``): 2 for bad input (a config field, a corpus, a
missing checkpoint: fix the command), 1 for a run that failed, 130 for an interrupted one.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.commands import CommandFailed, UsageError
from pipeline.redact import install_log_redaction, redact
from pipeline.train import ResumeMismatchError, TrainingError, TrainingInterrupted

# verb -> module in pipeline.commands; each module has ``add_arguments(parser)`` and ``run(args)``.
VERBS: dict[str, str] = {
    "demo": "Build the demo corpus and run the main job on embedded defaults.",
    "train": "Train DINO on Ray Train (local or cluster).",
    "distill": "Distil a frozen teacher into a student of any timm architecture.",
    "evaluate": "k-NN evaluation of a checkpoint or registered model.",
    "tune": "Hyper-parameter sweep with Ray Tune (ASHA on k-NN top-1).",
    "register": "Register a run's teacher backbone in the MLflow model registry.",
    "submit": "Submit a job verb to a Ray cluster and stream its logs.",
    "data": "Inspect a corpus or convert an image folder to Parquet shards.",
    "models": "List, pull or embed with registered teacher backbones.",
}

# error -> exit status, the first match wins: a ValueError is the input's fault (the project's
# ConfigError, CorpusError, DataQualityError, ResourceError, ArchError, ... are ValueErrors)
EXIT_STATUS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (TrainingInterrupted, 130),
    (CommandFailed, 1),
    ((UsageError, ResumeMismatchError, ValueError, FileNotFoundError), 2),
    # storage that did not answer (pipeline.checkpoints.StorageUnavailableError) and other I/O
    ((TrainingError, OSError), 1),
)
MAX_MESSAGE = 400  # e.g. MLflow's connection errors carry the whole URL and stack


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-ray", description="DINO self-supervised training on Ray, tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, help_text in VERBS.items():
        module = importlib.import_module(f"pipeline.commands.{verb}")
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def exit_status(exc: BaseException) -> int | None:
    """The exit status for an error a verb raised; None for an unexpected one (a bug: its
    traceback is shown)."""
    for types, status in EXIT_STATUS:
        if isinstance(exc, types):
            return status
    # MLflow's errors (a server down, a name taken) need mlflow imported, 6 s on 2 cores: only
    # here, once an error has happened, not for every `dino-ray --help`
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    return 1 if isinstance(exc, MlflowException) else None


def error_line(verb: str, exc: BaseException) -> str:
    """``dino-ray VERB: Type: message`` on one line, secrets masked, at most MAX_MESSAGE chars."""
    message = redact(str(exc).strip().replace("\n", " | "))
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + " ..."
    shown = "" if isinstance(exc, (UsageError, CommandFailed)) else f"{type(exc).__name__}: "
    return f"dino-ray {verb}: {shown}{message}"


def main(argv: list[str] | None = None) -> int:
    install_log_redaction()  # dino_ray log lines never show URI passwords or signed-URL keys
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"dino-ray {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - mapped here, in one place; unknown ones re-raised
        status = exit_status(exc)
        if status is None:
            raise
        print(error_line(args.verb, exc), file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
