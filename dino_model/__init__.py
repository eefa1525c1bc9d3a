"""DINO in pure PyTorch (no Ray): backbone, head, multi-crop wrapper, loss, EMA teacher,
schedules, optimiser helpers and the evaluation maths (features of uint8 images, weighted k-NN
and its figures, linear probe). The bottom layer: it imports nothing from ``pipeline``.

The names below are imported on first use (PEP 562), not with the package: the crop actors
import ``dino_model.masking`` (numpy only) for the iBOT masks, and importing the package eagerly
would load torch there, +3.3 s of CPU in every actor for nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dino_model.backbone import build_backbone
    from dino_model.ema import update_teacher
    from dino_model.features import embed, pixel_features
    from dino_model.head import DINOHead
    from dino_model.knn import NeighbourVotes, knn_classify, knn_metrics
    from dino_model.loss import DINOLoss
    from dino_model.model import build_student_teacher
    from dino_model.multicrop import MultiCropWrapper

_EXPORTS = {
    "DINOHead": "dino_model.head",
    "DINOLoss": "dino_model.loss",
    "MultiCropWrapper": "dino_model.multicrop",
    "NeighbourVotes": "dino_model.knn",
    "build_backbone": "dino_model.backbone",
    "build_student_teacher": "dino_model.model",
    "embed": "dino_model.features",
    "knn_classify": "dino_model.knn",
    "knn_metrics": "dino_model.knn",
    "pixel_features": "dino_model.features",
    "update_teacher": "dino_model.ema",
}

__all__ = [
    "DINOHead",
    "DINOLoss",
    "MultiCropWrapper",
    "NeighbourVotes",
    "build_backbone",
    "build_student_teacher",
    "embed",
    "knn_classify",
    "knn_metrics",
    "pixel_features",
    "update_teacher",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dino_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value
