"""The ``champion`` aliases of a registered model, from evaluation records only.

A version is *comparable* when the MLflow run it came from holds

* the param ``eval_key`` (``pipeline.registry.eval_key``; MLflow params cannot be changed once
  logged) and
* a finite figure for that version: the metric ``registered/v<N>/knn_top1`` (``version_figure``),
  logged once when version N was registered, from the run's ``knn_top1`` at that moment. Training
  never writes that key, so the figure a version competes with does not move when the run is
  continued or anyone logs ``knn_top1`` again. Versions registered before it existed compete on
  the run's latest ``knn_top1``.

Version tags are never read: anyone can edit them, and a hand-written ``knn_top1`` tag must not
move an alias. ``update_champion`` then sets

* ``champion-<eval_key>``: the best comparable version of each evaluation setting;
* ``champion``: the best version *of the current champion's setting*. Only when the current
  champion is missing or not comparable does it switch, to the setting of ``prefer`` (the version
  just registered) or else the newest comparable version. A figure on other data therefore never
  takes ``champion``; to make another data set the headline, point ``champion`` at one of its
  versions by hand and the next registration keeps that setting.
Ties go to the newer version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

CHAMPION = "champion"
EVAL_KEY_PARAM = "eval_key"
FIGURE_METRIC = "knn_top1"


@dataclass(frozen=True)
class Entry:
    version: int
    eval_key: str
    figure: float


def version_figure(version: int | str) -> str:
    """The run metric that holds version ``version``'s figure, fixed at its registration."""
    return f"registered/v{int(version)}/{FIGURE_METRIC}"


def champion_alias(key: str) -> str:
    """The per-setting alias, e.g. ``champion-3f9c0a1b2d4e``."""
    return f"{CHAMPION}-{key}"


def comparable_entries(client, name: str) -> list[Entry]:
    """Every version of ``name`` whose source run records an eval_key param and a finite figure
    for it; versions without a run, or whose run was deleted, are left out."""
    runs: dict[str, tuple[str | None, dict[str, float]]] = {}
    entries = []
    for mv in client.search_model_versions(f"name='{name}'"):
        if not mv.run_id:
            continue
        if mv.run_id not in runs:
            try:
                data = client.get_run(mv.run_id).data
                runs[mv.run_id] = (data.params.get(EVAL_KEY_PARAM), dict(data.metrics))
            except MlflowException:
                runs[mv.run_id] = (None, {})
        key, metrics = runs[mv.run_id]
        figure = metrics.get(version_figure(mv.version), metrics.get(FIGURE_METRIC))
        if key and figure is not None and math.isfinite(figure):
            entries.append(Entry(int(mv.version), key, float(figure)))
    return entries


def _current(client, name: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:  # no such alias yet
        return None


def update_champion(client, name: str, prefer: int | None = None) -> int | None:
    """Move ``champion`` and every ``champion-<eval_key>`` of registered model ``name`` (see the
    module docstring); return the version ``champion`` points at, or None (left unset) when no
    version is comparable."""
    entries = comparable_entries(client, name)
    if not entries:
        return None
    best: dict[str, Entry] = {}
    for e in entries:
        if e.eval_key not in best or (e.figure, e.version) > (
            best[e.eval_key].figure,
            best[e.eval_key].version,
        ):
            best[e.eval_key] = e
    for key, e in best.items():
        client.set_registered_model_alias(name, champion_alias(key), str(e.version))

    by_version = {e.version: e for e in entries}
    current = _current(client, name)
    if current in by_version:
        setting = by_version[current].eval_key
    elif prefer in by_version:
        setting = by_version[prefer].eval_key
    else:
        setting = max(entries, key=lambda e: e.version).eval_key
    winner = best[setting].version
    if winner != current:
        client.set_registered_model_alias(name, CHAMPION, str(winner))
    return winner
