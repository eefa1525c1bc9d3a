"""Ray job entrypoint: `python jobs/evaluate.py ...` (what
`ray job submit -- python jobs/evaluate.py` runs).

Same arguments as `dino-ray evaluate`; the driver joins the cluster through $RAY_ADDRESS (set by Ray
for submitted jobs), else starts an embedded Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
