"""`dino-ray demo`: the README's main job."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", default=".dino-ray/demo", help="where data, runs and mlflow.db go"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="changes to configs/demo.yaml, e.g. train.epochs=30",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(args.workdir, args.overrides)
