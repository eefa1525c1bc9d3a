"""Which code is running: the package version and the git commit, for tags and job metadata.

A base module beside ``config.py``: the registry tags a model version with ``code_version()`` and
``dino-ray submit`` stamps a job with ``git_sha()``, so neither reaches into the other for it.
"""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path


def code_version() -> str:
    """``<package version>+g<git sha>`` ($DINO_RAY_GIT_SHA wins: jobs ship without .git)."""
    try:
        ver = metadata.version("dino-ray")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        ver = "0+unknown"
    sha = os.environ.get("DINO_RAY_GIT_SHA") or git_sha()
    return f"{ver}+g{sha}" if sha else ver


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The 12-character commit of the checkout holding ``cwd`` (default: this package), or None
    outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=cwd or Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
