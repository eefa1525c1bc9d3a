"""A transient storage error while reading an image (an S3 503) is retried and never counted as a
bad image; one that persists fails the task (Ray retries it); only bytes that were read and do
not decode are counted (issue 22 #7). The storage is a filesystem whose reads of chosen files fail
with the error pyarrow raises for an S3 503 before they succeed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.fs as pafs
import pytest
from presets import TINY

from pipeline.config import AugmentConfig
from pipeline.data.dataset import MultiCropStage
from pipeline.data.eval_crop import center_crops

S3_503 = (
    "When reading information for key 'corpus/0/1.png' in bucket 'dino': AWS Error "
    "SERVICE_UNAVAILABLE during GetObject operation: Service Unavailable"
)


class FlakyStorage:
    """Local files; the reads of ``flaky`` paths fail ``fails`` times with an S3 503 first."""

    def __init__(self, flaky: list[str], fails: int) -> None:
        self.local = pafs.LocalFileSystem()
        self.left = dict.fromkeys(flaky, fails)
        self.reads: Counter[str] = Counter()

    def open_input_stream(self, path: str):
        self.reads[path] += 1
        if self.left.get(path, 0) > 0:
            self.left[path] -= 1
            raise OSError(S3_503)
        return self.local.open_input_stream(path)


class Counts:
    """Stands in for the ``DataHandle`` the crop stage reports its counts to."""

    def __init__(self) -> None:
        self.decoded, self.skipped = 0, Counter()

    def add(self, decoded, skipped, converted, examples=None, wait=True) -> None:
        self.decoded += decoded
        self.skipped.update(skipped)


@pytest.fixture
def corpus(digits_dir, tmp_path) -> tuple[list[str], str]:
    """Three real digit PNGs and one file whose bytes are not an image: (paths, corrupt path)."""
    good = sorted(str(p) for p in (digits_dir / "0").glob("*.png"))[:3]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"these bytes were read, and they are not an image")
    return [*good, str(corrupt)], str(corrupt)


def _batch(paths: list[str]) -> dict[str, np.ndarray]:
    return {
        "key": np.array(paths),
        "epoch": np.zeros(len(paths), np.int64),
        "label": np.zeros(len(paths), np.int64),
    }


def _crop_stage(storage, counts) -> MultiCropStage:
    augment = AugmentConfig.model_validate(
        {k.split(".", 1)[1]: v for k, v in TINY.items() if k.startswith("augment.")}
    )
    return MultiCropStage(
        augment.model_dump(mode="json"), 0, storage, state=counts, with_label=True
    )


def test_the_crop_stage_retries_a_503_and_counts_only_the_corrupt_and_the_gone(corpus, tmp_path):
    paths, corrupt = corpus
    gone = str(tmp_path / "gone.png")  # listed, then deleted: no retry can bring it back
    storage = FlakyStorage([paths[1]], fails=2)
    counts = Counts()
    out = _crop_stage(storage, counts)(_batch([*paths, gone]))

    assert len(out["label"]) == 3  # the image behind two 503s was read and cropped
    assert storage.reads[paths[1]] == 3
    assert counts.skipped == Counter({"not_image": 1, "unreadable": 1})  # nothing else
    assert counts.decoded == 3
    assert storage.reads[gone] == 1


def test_a_503_that_persists_fails_the_crop_task_and_is_not_counted(corpus):
    paths, _ = corpus
    storage = FlakyStorage([paths[0]], fails=100)
    counts = Counts()
    with pytest.raises(OSError, match=r"transient storage error .*SERVICE_UNAVAILABLE"):
        _crop_stage(storage, counts)(_batch(paths))
    assert storage.reads[paths[0]] == 4  # a bounded number of tries
    assert counts.skipped == Counter() and counts.decoded == 0  # the batch was not counted


def test_the_evaluation_crops_retry_a_503_and_count_the_corrupt_image(corpus):
    paths, corrupt = corpus
    storage = FlakyStorage([paths[2]], fails=1)
    crops = center_crops(_batch(paths), storage, 32, 36)
    assert crops.keep.tolist() == [True, True, True, False]
    assert crops.skipped == Counter({"not_image": 1})
    assert crops.examples == [f"not_image: {corrupt}"]
    with pytest.raises(OSError, match="transient storage error"):
        center_crops(_batch(paths), FlakyStorage([paths[0]], fails=100), 32, 36)
