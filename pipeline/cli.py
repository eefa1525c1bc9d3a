"""``dino-ray``: one console script, one sub-command module per verb (pipeline/commands/)."""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module in pipeline.commands; each module has ``add_arguments(parser)`` and ``run(args)``.
VERBS: dict[str, str] = {
    "demo": "Build the demo corpus and run the main job on embedded defaults.",
    "train": "Train DINO on Ray Train (local or cluster).",
    "evaluate": "k-NN evaluation of a checkpoint or registered model.",
    "tune": "Hyper-parameter sweep with Ray Tune (ASHA on k-NN top-1).",
    "register": "Register a run's teacher backbone in the MLflow model registry.",
    "submit": "Submit a job verb to a Ray cluster and stream its logs.",
    "data": "Inspect a corpus or convert an image folder to Parquet shards.",
    "models": "List, pull or embed with registered teacher backbones.",
}


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


def main(argv: list[str] | None = None) -> int:
    from pipeline.redact import install_log_redaction, redact

    install_log_redaction()  # dino_ray log lines never show URI passwords or signed-URL keys
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:  # the project's own errors: one line, never a traceback
        message = redact(str(exc)).strip().replace("\n", " | ")  # redacted before the cut
        if len(message) > 400:  # e.g. MLflow's connection errors carry the whole URL and stack
            message = message[:400] + " ..."
        print(f"dino-ray {args.verb}: {type(exc).__name__}: {message}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem with the input or the cluster, raised with a message that
    names it: bad config or field, corpus, data quality, resources, a failed run, MLflow."""
    from pipeline.config import ConfigError
    from pipeline.data.quality import DataQualityError
    from pipeline.data.resources import ResourceError
    from pipeline.data.sources import CorpusError
    from pipeline.train.failures import ResumeMismatchError, TrainingError

    errors: list[type[BaseException]] = [
        ConfigError,
        CorpusError,
        DataQualityError,
        ResourceError,
        ResumeMismatchError,
        TrainingError,
        FileNotFoundError,
    ]
    try:
        from mlflow.exceptions import MlflowException

        errors.append(MlflowException)
    except ImportError:
        pass
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
