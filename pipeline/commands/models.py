"""`dino-ray models`."""

import argparse

from pipeline.commands import not_yet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    return not_yet("models", "open issue")
