"""One module per ``dino-ray`` verb: ``add_arguments(parser)`` and ``run(args) -> int``.

The top layer of the package: a verb may import any layer below it (``pipeline.tune``,
``pipeline.registry``, ``pipeline.training_run``, ...); nothing but ``pipeline.cli`` imports a verb.
A verb raises on failure; ``pipeline.cli`` maps the error to the exit status and the message.
Shared here: ``add_config_arguments`` (``--config`` and ``section.field=value`` overrides) and
the two errors a verb raises for itself.

The heavy imports of a verb (torch, Ray Train and Data, MLflow, timm) stay inside ``run``: the
parser imports every verb's module, and ``dino-ray --help`` would import them all (measured in the
README's "Command-line start-up": under a second against tens of seconds on 2 cores).
"""

import argparse

__all__ = ["CommandFailed", "UsageError", "add_config_arguments"]


class UsageError(ValueError):
    """The command cannot run as given (exit 2): the message names what to change."""


class CommandFailed(RuntimeError):
    """The command ran and did not succeed (exit 1): the message says what happened."""


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """``--address``: the Ray cluster a command that runs Ray work joins."""
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded Ray)",
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="override config fields, e.g. train.epochs=3",
    )
