"""One run per name at a time: a lease file in the run directory, renewed by a heartbeat.

Two drivers training the same ``train.name`` at once would overwrite each other's checkpoints
(same step names, same file sizes), delete each other's folders through Ray's ``num_to_keep`` and
log into one MLflow run. The driver takes ``.lease.json`` before any Ray work and renews it every
``renew_s`` while it runs; a second driver finds it fresh and is refused with the holder named. A
lease not renewed for ``stale_after_s`` (its driver was killed) is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from pipeline.data.sources import resolve_filesystem
from pipeline.preflight import PreflightError

log = logging.getLogger("dino_ray.train")

LEASE_FILE = ".lease.json"
STALE_AFTER_S = 120.0  # a driver renews every STALE_AFTER_S / 4: three missed renewals and more
CONFIRM_DELAY_S = 0.5  # two drivers writing at the same moment: the one read back wins


class RunInUseError(PreflightError):
    """Another driver holds the run's name; the message names it."""


class RunLease:
    """The lease of one run directory while this driver trains it (a context manager)."""

    def __init__(
        self, run_directory: str, name: str, *, stale_after_s: float = STALE_AFTER_S
    ) -> None:
        self.run_directory = run_directory
        self.name = name
        self.stale_after_s = stale_after_s
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        fs, base = resolve_filesystem(run_directory)
        self._fs, self._path = fs, base.rstrip("/") + "/" + LEASE_FILE
        self._base = base

    # the lease file

    def _read(self) -> dict[str, Any] | None:
        try:
            with self._fs.open_input_stream(self._path) as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            return None
        except ValueError:  # a torn write: treat it as no lease, ours replaces it
            return None

    def _write(self) -> None:
        record = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "renewed": time.time(),
        }
        self._fs.create_dir(self._base, recursive=True)
        with self._fs.open_output_stream(self._path) as f:
            f.write(json.dumps(record).encode())

    # taking, renewing, giving back

    def acquire(self) -> RunLease:
        """Take the lease or raise ``RunInUseError`` naming the driver that holds it."""
        held = self._read()
        if held is not None and held.get("owner") != self.owner:
            age = time.time() - float(held.get("renewed", 0))
            if age < self.stale_after_s:
                raise RunInUseError(_in_use_message(self.name, self.run_directory, held, age))
            log.warning(
                "train.name %r: taking over a lease not renewed for %.0f s (its driver, %s pid "
                "%s, is gone)",
                self.name,
                age,
                held.get("host"),
                held.get("pid"),
            )
        self._write()
        time.sleep(CONFIRM_DELAY_S)
        held = self._read()
        if held is None or held.get("owner") != self.owner:  # another driver wrote after us
            raise RunInUseError(_in_use_message(self.name, self.run_directory, held or {}, 0.0))
        self._thread = threading.Thread(target=self._renew, name="dino-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                self._write()
            except OSError as exc:  # one missed renewal is harmless; three make the lease stale
                log.warning("could not renew the lease of %s: %r", self.run_directory, exc)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            held = self._read()
            if held is not None and held.get("owner") == self.owner:
                self._fs.delete_file(self._path)
        except OSError as exc:  # it expires by itself
            log.warning("could not release the lease of %s: %r", self.run_directory, exc)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _in_use_message(name: str, run_directory: str, held: dict[str, Any], age: float) -> str:
    started = held.get("started")
    since = (
        datetime.fromtimestamp(float(started), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if started
        else "an unknown time"
    )
    return (
        f"train.name: run {name!r} is being trained by another driver ({held.get('host')} pid "
        f"{held.get('pid')}, since {since}, alive {age:.0f} s ago; {run_directory}/{LEASE_FILE}). "
        "Choose another train.name, or wait for it to finish (a driver that was killed releases "
        f"the name {STALE_AFTER_S:.0f} s after its last renewal)"
    )
