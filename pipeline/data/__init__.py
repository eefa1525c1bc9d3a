"""The data layer: list a corpus, decode + multi-crop on CPU actors, stream to train workers;
the labelled evaluation sets (resize + centre crop) and their split from the training images.

Imports only ``dino_model`` and the shared base modules (config, ray_runtime, cluster, ...).
"""

from pipeline.data.dataset import TrainDataset, build_train_dataset, list_data
from pipeline.data.decode import BadImage, decode_bytes, read_bytes
from pipeline.data.eval_crop import center_crops, resize_center_crop
from pipeline.data.eval_sets import (
    EvalSets,
    build_eval_dataset,
    build_eval_datasets,
    build_eval_sets,
    materialize,
    materialize_for_training,
    materialize_task,
)
from pipeline.data.quality import DataQualityError, check_skip_share
from pipeline.data.resources import ResourceError, ResourcePlan, plan_from_config
from pipeline.data.sources import Corpus, CorpusError, list_corpus, resolve_filesystem
from pipeline.data.split import image_keys, split_indices

__all__ = [
    "BadImage",
    "Corpus",
    "CorpusError",
    "DataQualityError",
    "EvalSets",
    "ResourceError",
    "ResourcePlan",
    "TrainDataset",
    "build_eval_dataset",
    "build_eval_datasets",
    "build_eval_sets",
    "build_train_dataset",
    "center_crops",
    "check_skip_share",
    "decode_bytes",
    "image_keys",
    "list_corpus",
    "list_data",
    "materialize",
    "materialize_for_training",
    "materialize_task",
    "plan_from_config",
    "read_bytes",
    "resize_center_crop",
    "resolve_filesystem",
    "split_indices",
]
