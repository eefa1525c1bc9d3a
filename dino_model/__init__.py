"""DINO in pure PyTorch (no Ray): backbone, head, multi-crop wrapper, loss, EMA teacher,
schedules, optimiser helpers and k-NN evaluation maths."""

from dino_model.backbone import build_backbone
from dino_model.ema import update_teacher
from dino_model.head import DINOHead
from dino_model.knn import knn_classify
from dino_model.loss import DINOLoss
from dino_model.multicrop import MultiCropWrapper
from dino_model.model import build_student_teacher

__all__ = [
    "DINOHead",
    "DINOLoss",
    "MultiCropWrapper",
    "build_backbone",
    "build_student_teacher",
    "knn_classify",
    "update_teacher",
]
