"""`dino-ray models list|pull|embed|export`: registered teacher backbones.

dino-ray models list [--name dino-teacher]
dino-ray models pull models:/dino-teacher@champion ./teacher
dino-ray models embed models:/dino-teacher@champion ./images ./embeddings.parquet
dino-ray models export models:/dino-teacher@champion ./teacher_timm --format timm
dino-ray models export models:/dino-teacher@champion ./teacher.onnx --format onnx
"""

from __future__ import annotations

import argparse
import os

DEFAULT_URI = "sqlite:///mlflow.db"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow URI (default $MLFLOW_TRACKING_URI or {DEFAULT_URI})",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="registered versions with aliases and k-NN top-1")
    p.add_argument("--name", help="only this registered model")
    p = sub.add_parser("pull", help="download a model (MLmodel, weights, arch.json) to DIR")
    p.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or NAME@ALIAS")
    p.add_argument("dst_dir")
    p = sub.add_parser("embed", help="embed an image folder / Parquet corpus to Parquet (Ray Data)")
    p.add_argument("model_uri")
    p.add_argument("src", help="image folder tree or Parquet file/folder (any pyarrow URI)")
    p.add_argument("dst", help="output Parquet folder")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-actors", type=int, default=1, help="size of the inference actor pool")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, help="default: the backbone's training size")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--limit", type=int)
    p = sub.add_parser(
        "export",
        help="write a model for timm (a folder) or ONNX (a .onnx file), no dino-ray needed",
    )
    p.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or NAME@ALIAS")
    p.add_argument("dst", help="timm: a folder; onnx: a .onnx file (or a folder for model.onnx)")
    p.add_argument("--format", required=True, choices=["timm", "onnx"], dest="fmt")


def _uri(args: argparse.Namespace) -> str:
    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        from pipeline.registry.pull import list_models

        rows = list_models(_uri(args), args.name)
        if not rows:
            print("no registered models")
            return 0
        cols = [
            "name",
            "version",
            "aliases",
            "knn_top1",
            "eval_key",
            "epochs",
            "arch",
            "code_version",
            "run_id",
        ]
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        print("  ".join(c.ljust(widths[c]) for c in cols))
        for r in rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
        return 0
    if args.action == "pull":
        from pipeline.registry.pull import pull

        local = pull(args.model_uri, args.dst_dir, _uri(args))
        print(f"pulled {args.model_uri} to {local}")
        print("load it with: pipeline.registry.load_backbone(DIR) or mlflow.pyfunc.load_model(DIR)")
        return 0
    if args.action == "export":
        return _export(args)
    from pipeline.evaluate.embed import check_output_empty, embed_corpus
    from pipeline.registry.pull import load_package_bytes, module_from_bytes

    check_output_empty(args.dst)  # before the package download
    # the registry fetches and validates the package; evaluation only runs it
    package = load_package_bytes(args.model_uri, _uri(args))
    result = embed_corpus(
        package,
        args.src,
        args.dst,
        build_module=module_from_bytes,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        image_size=args.image_size,
        image_column=args.image_column,
        label_column=args.label_column or None,
        limit=args.limit,
        address=args.address,
    )
    print(f"wrote {result.num_rows} embeddings (dim {result.embed_dim}) to {result.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.registry.export import export_model

    exported = export_model(args.model_uri, args.dst, args.fmt, _uri(args))
    print(f"exported {args.model_uri} ({exported.format}) to {exported.path}")
    if exported.max_abs_diff is not None:
        print(f"onnxruntime matches torch: max |difference| {exported.max_abs_diff:.2g}")
    print(f"load it with: {exported.usage}")
    return 0
