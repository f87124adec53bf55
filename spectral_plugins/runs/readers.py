"""Read a tracked run back into a :class:`~spectral_plugins.lifecycle.history.SpectralHistory`.

A run is named by a spec string:

- ``mlflow:<run_id>``: an MLflow run (``MlflowClient``, tracking URI from ``--tracking-uri`` or
  ``MLFLOW_TRACKING_URI``);
- a ``.json`` file: a saved history (:meth:`SpectralHistory.to_json`) or a lifecycle state dict
  (``{"history": ...}``, :meth:`SpectralLifecycle.state_dict`);
- a directory: TensorBoard event files in it or below it (all of them merged by tag).

Only scalars named ``spectral_<metric>/<layer_key>`` are read (``layer_key`` like ``L03_q``); depth
and role come from the key. MLflow and TensorBoard are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..lifecycle.history import SpectralHistory, parse_matrix_tag

MLFLOW_PREFIX = "mlflow:"
LIFECYCLE_METRICS: tuple[str, ...] = ("stable_rank", "alpha")
Scalars = dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class LoadedRun:
    """One run read back: a display ``name``, where it came from (``source``) and its ``history``."""

    name: str
    source: str
    history: SpectralHistory


def load_run(spec: str, tracking_uri: str | None = None,
             metrics: Sequence[str] | None = LIFECYCLE_METRICS) -> LoadedRun:
    """Read the run named by ``spec`` (see the module docs); ``metrics=None`` reads every metric."""
    if spec.startswith(MLFLOW_PREFIX):
        run_id = spec[len(MLFLOW_PREFIX):]
        name, scalars = read_mlflow_scalars(run_id, tracking_uri, metrics)
        return LoadedRun(name, spec, SpectralHistory.from_scalars(scalars))
    path = Path(spec)
    if path.is_file():
        body = json.loads(path.read_text())
        state = body.get("history", body) if isinstance(body, dict) else body
        return LoadedRun(path.stem, spec, SpectralHistory.from_state(state))
    if path.is_dir():
        scalars = read_tensorboard_scalars(path, metrics)
        return LoadedRun(path.name or str(path), spec, SpectralHistory.from_scalars(scalars))
    raise FileNotFoundError(f"no run at {spec!r}: give a TensorBoard log dir, a history .json "
                            "or mlflow:<run_id>")


def _wanted(tag: str, metrics: Sequence[str] | None) -> bool:
    parsed = parse_matrix_tag(tag)
    return parsed is not None and (metrics is None or parsed[0] in metrics)


def read_tensorboard_scalars(log_dir: str | Path,
                             metrics: Sequence[str] | None = LIFECYCLE_METRICS) -> Scalars:
    """``{tag: [(step, value), ...]}`` of the ``spectral_<metric>/<key>`` scalars of every event file
    under ``log_dir`` (scalar events and TF2 scalar tensors alike); later files win on equal steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for directory in sorted({p.parent for p in Path(log_dir).rglob("*tfevents*")}):
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            if _wanted(tag, metrics):
                out.setdefault(tag, {}).update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
        for tag in tags.get("tensors", []):
            if _wanted(tag, metrics):
                points = {int(e.step): _tensor_value(e.tensor_proto) for e in acc.Tensors(tag)}
                out.setdefault(tag, {}).update(points)
    if not out:
        raise ValueError(f"no spectral_<metric>/<layer_key> scalars under {log_dir}")
    return {tag: sorted(points.items()) for tag, points in out.items()}


def _tensor_value(proto: Any) -> float:
    from tensorboard.util import tensor_util

    return float(tensor_util.make_ndarray(proto).reshape(-1)[0])


def _client(tracking_uri: str | None) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "reading MLflow runs needs mlflow: pip install 'spectral-plugins[mlflow]'") from error
    return MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def read_mlflow_scalars(run_id: str, tracking_uri: str | None = None,
                        metrics: Sequence[str] | None = LIFECYCLE_METRICS) -> tuple[str, Scalars]:
    """(run name, ``{key: [(step, value), ...]}``) of one MLflow run's spectral metrics."""
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    name = run.info.run_name or run_id
    scalars: Scalars = {}
    for key in run.data.metrics:
        if _wanted(key, metrics):
            scalars[key] = [(int(m.step), float(m.value)) for m in client.get_metric_history(run_id, key)]
    if not scalars:
        raise ValueError(f"MLflow run {run_id} has no spectral_<metric>/<layer_key> metrics")
    return name, scalars


def mlflow_experiment_runs(experiments: Iterable[str], tracking_uri: str | None = None) -> list[str]:
    """``mlflow:<run_id>`` specs of every run of the named (or numbered) experiments."""
    client = _client(tracking_uri)
    ids = []
    for name_or_id in experiments:
        experiment = client.get_experiment_by_name(name_or_id)
        if experiment is None:
            experiment = client.get_experiment(name_or_id)
        ids.append(experiment.experiment_id)
    runs = client.search_runs(experiment_ids=ids, max_results=10_000)
    return [f"{MLFLOW_PREFIX}{run.info.run_id}" for run in runs]
