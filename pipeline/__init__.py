"""dino-ray: DINO self-supervised training on Ray, tracked in MLflow.

The packages form layers along the data flow; a module imports only from its own layer or the
ones below it (``[tool.importlinter]`` in pyproject.toml checks it, tests/test_layers.py runs it):

    jobs, pipeline.cli                       entry points
    pipeline.commands                        one module per ``dino-ray`` verb
    pipeline.demo                            the main job of ``make demo``
    pipeline.tune                            Ray Tune sweeps
    pipeline.training_run                    train (from registered weights too), then evaluate
    pipeline.distill_run                     distil a frozen teacher into a student, then evaluate
    pipeline.registry                        MLflow model registry
    pipeline.train | pipeline.evaluate       Ray Train | Ray Data k-NN and batch inference
    pipeline.checkpoints | pipeline.tracking   checkpoints | MLflow run logging
    pipeline.data                            corpora, multi-crop and evaluation datasets
    config, preflight, cluster, ray_runtime, redact, version   shared base modules
    dino_model                               DINO in pure PyTorch, no Ray

Training and evaluation never import each other: they meet at checkpoints.
"""

__all__: list[str] = []
