"""`dino-ray data`: ``inspect PATH`` (counts, classes, sizes, unreadable files) and
``to-parquet SRC DST`` (folder tree -> Parquet shards of encoded images).

Exit status: 0 done (``to-parquet`` may have skipped files: counted on stderr and in the JSON
summary), 2 bad input (missing path, destination not empty without ``--overwrite``, nothing
convertible), with a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ins = sub.add_parser("inspect", help="image count, classes, size distribution, bad files")
    ins.add_argument("path", nargs="+", help="folder, Parquet file/folder, glob or URI")
    ins.add_argument("--format", choices=["auto", "folder", "parquet"], default="auto")
    ins.add_argument("--image-column", default="image")
    ins.add_argument("--label-column", default="label")
    ins.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only N images, spread evenly over the classes (seeded)",
    )
    ins.add_argument(
        "--header-only",
        action="store_true",
        help="read headers only (fast; truncated files are not detected)",
    )
    ins.add_argument("--threads", type=int, default=4)
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    conv = sub.add_parser("to-parquet", help="pack an image folder tree into Parquet shards")
    conv.add_argument("src", help="folder tree (class sub-folders become labels)")
    conv.add_argument("dst", help="output folder or URI (s3://..., gs://..., file://...)")
    conv.add_argument("--rows-per-shard", type=int, default=10_000)
    conv.add_argument("--row-group-size", type=int, default=1_000)
    conv.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="shuffle rows across the whole corpus so every shard mixes classes "
        "(default; --no-shuffle keeps the sorted path order)",
    )
    conv.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    conv.add_argument("--verify", action="store_true", help="also skip files that do not decode")
    conv.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the part-*.parquet shards already in DST (nothing else)",
    )
    conv.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only N images, spread evenly over the classes (seeded)",
    )
    conv.add_argument("--threads", type=int, default=4, help="files read (and verified) at once")


def run(args: argparse.Namespace) -> int:
    if args.action == "inspect":
        from pipeline.data.inspection import format_report, inspect_corpus

        path = args.path[0] if len(args.path) == 1 else args.path
        report = inspect_corpus(
            path,
            args.format,
            args.image_column,
            args.label_column or None,
            args.limit,
            full_decode=not args.header_only,
            threads=args.threads,
        )
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0
    from pipeline.data.parquet import folder_to_parquet

    summary = folder_to_parquet(
        args.src,
        args.dst,
        args.rows_per_shard,
        args.row_group_size,
        args.shuffle,
        args.seed,
        args.verify,
        args.limit,
        overwrite=args.overwrite,
        threads=args.threads,
    )
    print(json.dumps(summary))
    if summary["skipped"]:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(summary["skipped_by_reason"].items()))
        print(
            f"dino-ray data: skipped {summary['skipped']} files ({reasons}); e.g. "
            f"{', '.join(summary['skipped_examples'])}",
            file=sys.stderr,
        )
    return 0
