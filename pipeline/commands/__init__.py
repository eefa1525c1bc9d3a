"""One module per ``dino-ray`` verb: ``add_arguments(parser)`` and ``run(args) -> int``.

The top layer of the package: a verb may import any layer below it (``pipeline.tune``,
``pipeline.registry``, ``pipeline.training_run``, ...); nothing but ``pipeline.cli`` imports a verb.
Shared here: ``add_config_arguments`` (``--config`` and ``section.field=value`` overrides).
"""

import argparse
import sys

__all__ = ["add_config_arguments", "not_yet"]


def not_yet(verb: str, issue: str) -> int:
    print(f"dino-ray {verb}: not yet implemented ({issue})", file=sys.stderr)
    return 2


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="override config fields, e.g. train.epochs=3",
    )
