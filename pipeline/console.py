"""What a person sees in the terminal: our progress lines plain at INFO, warnings (ours and third
parties') as ``WARNING name: message``, and the noise of libraries that log expected events at
INFO or WARNING (MLflow's model signature inference, alembic's migrations) kept off the screen."""

from __future__ import annotations

import logging
import sys

QUIET = {
    "alembic": logging.WARNING,  # the SQLite store's schema migrations on first use
    "mlflow": logging.ERROR,  # expected: signature inference and pip requirement guesses
    "urllib3": logging.ERROR,  # retries while an MLflow server is down: our tracker reports it
    "filelock": logging.WARNING,
}


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged (a handler bound to the stdout
    of the first caller kept writing there after it was replaced, e.g. under pytest)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the property always reads stdout
        pass


def setup_console(level: int = logging.WARNING) -> None:
    """Configure logging once for a command: ``dino_ray.progress`` at INFO as bare lines on
    stdout, everything else at ``level`` on stderr."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    progress = logging.getLogger("dino_ray.progress")
    if not any(getattr(h, "_dino_progress", False) for h in progress.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._dino_progress = True  # type: ignore[attr-defined]
        progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    progress.disabled = False  # a library's logging.config.dictConfig may have disabled it
    for name, lvl in QUIET.items():
        logging.getLogger(name).setLevel(lvl)
