"""`dino-ray demo`: the README's main job."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=".dino-ray/demo", help="where data, runs and mlflow.db go")


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(args.workdir)
