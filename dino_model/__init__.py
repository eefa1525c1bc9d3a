"""DINO in pure PyTorch (no Ray): backbone, head, multi-crop wrapper, loss, EMA teacher,
schedules, optimiser helpers and the evaluation maths (features of uint8 images, weighted k-NN
and its figures, linear probe). The bottom layer: it imports nothing from ``pipeline``."""

from dino_model.backbone import build_backbone
from dino_model.ema import update_teacher
from dino_model.features import embed, pixel_features
from dino_model.head import DINOHead
from dino_model.knn import NeighbourVotes, knn_classify, knn_metrics
from dino_model.loss import DINOLoss
from dino_model.model import build_student_teacher
from dino_model.multicrop import MultiCropWrapper

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
