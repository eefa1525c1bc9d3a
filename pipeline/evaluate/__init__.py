"""Evaluation of trained backbones as Ray Data batch inference.

``evaluate_knn`` / ``evaluate_test_split``: weighted k-NN (and a linear probe) of a checkpoint's
teacher against the random-init backbone and raw pixels; ``embed_corpus``: embeddings of a corpus
with a registered backbone, to Parquet. Imports only ``pipeline.data``,
``pipeline.checkpoints``, ``dino_model`` and the shared base modules: never ``pipeline.train``.
"""

from pipeline.evaluate.embed import Embedder, EmbedResult, embed_corpus
from pipeline.evaluate.knn_eval import (
    TEST_PREFIX,
    EmbedBatch,
    eval_on_gpu,
    evaluate_knn,
    evaluate_test_split,
)

__all__ = [
    "TEST_PREFIX",
    "EmbedBatch",
    "EmbedResult",
    "Embedder",
    "embed_corpus",
    "eval_on_gpu",
    "evaluate_knn",
    "evaluate_test_split",
]
