"""Ray job entrypoint: `python jobs/distill.py ...` (what `dino-ray submit distill` runs).

Same arguments as `dino-ray distill`; the driver joins the cluster through $RAY_ADDRESS (set by
Ray for submitted jobs), else starts an embedded Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
