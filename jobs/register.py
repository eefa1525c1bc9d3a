"""Ray job entrypoint: `python jobs/register.py [--config FILE] [section.field=value ...]`.

Submitted by `dino-ray submit register --address http://HEAD:8265 ...`; runs `dino-ray register` on
the cluster (the driver joins it through $RAY_ADDRESS, which Ray sets for jobs).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["register", *sys.argv[1:]]))
