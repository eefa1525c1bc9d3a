"""Training checkpoints, the hand-over point between training and everything after it.

``pipeline.train`` writes them, ``pipeline.evaluate``, ``pipeline.registry`` and the commands read
them; this package imports neither training nor evaluation, so both can depend on it. It holds:

* the files of one checkpoint (``state.pt``, ``config.yaml``, ``meta.json``): ``save_checkpoint``,
  ``load_state``, ``load_config``, ``read_meta``;
* where checkpoints live: ``run_dir``, ``resolve_storage_path``, ``newest_checkpoint`` (step
  and path) / ``newest_checkpoint_path``, ``checkpoint_uri``, ``as_local_dir`` and the run
  directory's small text files (``read_run_file`` / ``write_run_file``);
  ``check_storage_writable`` before a run, ``RunLease`` while it trains;
* the networks: ``build_models`` (the seeded student/teacher pair of a config),
  ``random_init_backbone`` (the teacher backbone as training starts) and
  ``load_teacher_backbone`` (the trained teacher's backbone of a checkpoint).
"""

from pipeline.checkpoints._lease import RunInUseError, RunLease
from pipeline.checkpoints._models import build_models, load_teacher_backbone, random_init_backbone
from pipeline.checkpoints._probe import check_storage_writable, storage_error_for_good
from pipeline.checkpoints._state import (
    CONFIG_FILE,
    META_FILE,
    STATE_FILE,
    load_config,
    load_state,
    read_meta,
    save_checkpoint,
)
from pipeline.checkpoints._storage import (
    StorageUnavailableError,
    as_local_dir,
    checkpoint_uri,
    newest_checkpoint,
    newest_checkpoint_path,
    read_run_file,
    resolve_storage_path,
    run_dir,
    write_run_file,
)

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "RunInUseError",
    "RunLease",
    "STATE_FILE",
    "StorageUnavailableError",
    "as_local_dir",
    "build_models",
    "check_storage_writable",
    "checkpoint_uri",
    "newest_checkpoint_path",
    "load_config",
    "load_state",
    "load_teacher_backbone",
    "newest_checkpoint",
    "random_init_backbone",
    "read_meta",
    "read_run_file",
    "resolve_storage_path",
    "run_dir",
    "save_checkpoint",
    "storage_error_for_good",
    "write_run_file",
]
