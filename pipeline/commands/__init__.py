"""One module per ``dino-ray`` verb: ``add_arguments(parser)`` and ``run(args) -> int``."""

import argparse
import sys


def not_yet(verb: str, issue: str) -> int:
    print(f"dino-ray {verb}: not yet implemented ({issue})", file=sys.stderr)
    return 2


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="override config fields, e.g. train.epochs=3")
