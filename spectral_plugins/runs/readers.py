"""Read a tracked run back into a :class:`~spectral_plugins.lifecycle.history.SpectralHistory`.

A run is named by a spec string:

- ``mlflow:<run_id>``: an MLflow run; ``mlflow-experiment:<name or id>``: every run of an experiment
  (tracking URI from ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default);
- ``wandb:<entity>/<project>/<run_id>``: an online W&B run, through ``wandb.Api`` (needs a login);
- a ``.json`` file: a saved history (:meth:`SpectralHistory.to_json`) or a lifecycle state dict
  (``{"history": ...}``, :meth:`SpectralLifecycle.state_dict`);
- a directory: an offline W&B run (``offline-run-*`` holding ``run-*.wandb``, or a directory with
  one below it and no TensorBoard events), else TensorBoard event files in it or below it (merged
  by tag).

Only scalars named ``spectral_<metric>/<layer_key>`` are read (``layer_key`` like ``L03_q``); depth
and role come from the key. Each run also brings its parameters (MLflow params, W&B config,
TensorBoard hparams). A run or store that cannot be found raises :class:`RunNotFound` with one line
saying where it looked and what to do; nothing is created on disk (a missing sqlite store is never
created). Trackers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lifecycle.history import SpectralHistory, parse_matrix_tag

MLFLOW_PREFIX = "mlflow:"
MLFLOW_EXPERIMENT_PREFIX = "mlflow-experiment:"
WANDB_PREFIX = "wandb:"
LIFECYCLE_METRICS: tuple[str, ...] = ("stable_rank", "alpha")
SPEC_HELP = ("a TensorBoard log dir, an offline W&B run dir, a history .json, mlflow:<run_id>, "
             "mlflow-experiment:<name>, or wandb:<entity>/<project>/<run_id>")
Scalars = dict[str, list[tuple[int, float]]]


class RunNotFound(FileNotFoundError):
    """A run, experiment or store that does not exist; the message is one line saying where it looked
    and how to point elsewhere."""


@dataclass(frozen=True)
class LoadedRun:
    """One run read back: a display ``name``, where it came from (``source``), its ``history`` and its
    parameters (``params``: MLflow params, W&B config or TensorBoard hparams, as strings)."""

    name: str
    source: str
    history: SpectralHistory
    params: Mapping[str, str] = field(default_factory=dict)


def load_run(spec: str, tracking_uri: str | None = None,
             metrics: Sequence[str] | None = LIFECYCLE_METRICS) -> LoadedRun:
    """Read the run named by ``spec`` (see the module docs); ``metrics=None`` reads every metric.

    Raises:
        RunNotFound: no such run, file or store.
        ValueError: the run holds no ``spectral_<metric>/<layer_key>`` scalars.
    """
    if spec.startswith(MLFLOW_PREFIX):
        return read_mlflow_run(spec[len(MLFLOW_PREFIX):], tracking_uri, metrics)
    if spec.startswith(WANDB_PREFIX):
        return read_wandb_api_run(spec[len(WANDB_PREFIX):], metrics)
    path = Path(spec)
    if path.is_file():
        body = json.loads(path.read_text())
        state = body.get("history", body) if isinstance(body, dict) else body
        return LoadedRun(path.stem, spec, SpectralHistory.from_state(state))
    if path.is_dir():
        wandb_dir = _wandb_offline_dir(path)
        if wandb_dir is not None:
            return read_wandb_offline(wandb_dir, spec, metrics)
        scalars = read_tensorboard_scalars(path, metrics)
        return LoadedRun(path.name or str(path), spec, SpectralHistory.from_scalars(scalars),
                         read_tensorboard_hparams(path))
    raise RunNotFound(f"no run at {spec!r}: give {SPEC_HELP}")


def expand_specs(specs: Iterable[str], tracking_uri: str | None = None) -> list[str]:
    """The specs with each ``mlflow-experiment:<name or id>`` replaced by its runs' ``mlflow:<id>``."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(MLFLOW_EXPERIMENT_PREFIX):
            out += mlflow_experiment_runs([spec[len(MLFLOW_EXPERIMENT_PREFIX):]], tracking_uri)
        else:
            out.append(spec)
    return out


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


def read_tensorboard_hparams(log_dir: str | Path) -> dict[str, str]:
    """The hparams of every HParams session under ``log_dir`` (Lightning's, the spectral one),
    merged, as strings; {} when there is none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    params: dict[str, str] = {}
    for directory in sorted({p.parent for p in Path(log_dir).rglob("*tfevents*")}):
        accumulator = EventAccumulator(str(directory), size_guidance={"tensors": 0})
        accumulator.Reload()
        try:
            content = accumulator.PluginTagToContent("hparams")
        except KeyError:  # no HParams session in this run
            continue
        if "_hparams_/session_start_info" not in content:
            continue
        data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        for name, value in data.session_start_info.hparams.items():
            kind = value.WhichOneof("kind")
            params.setdefault(name, _plain(getattr(value, kind)) if kind else "")
    return params


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def tracking_uri_in_use(tracking_uri: str | None) -> tuple[str, str]:
    """(the MLflow tracking URI to use, where it came from) without creating anything."""
    if tracking_uri:
        return tracking_uri, "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    import mlflow

    return mlflow.get_tracking_uri(), "MLflow's default"


def _client(tracking_uri: str | None) -> Any:
    """An ``MlflowClient`` for an existing store: a sqlite file or a local directory that does not
    exist is refused (MLflow would create an empty store there)."""
    try:
        from mlflow.tracking import MlflowClient
    except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "reading MLflow runs needs mlflow: pip install 'spectral-plugins[mlflow]'") from error
    uri, origin = tracking_uri_in_use(tracking_uri)
    local = _local_store(uri)
    if local is not None and not local.exists():
        raise RunNotFound(f"no MLflow store at {uri} (tracking URI from {origin}); pass --tracking-uri URI "
                          "(tracking_uri=...) or set MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri)


def _local_store(uri: str) -> Path | None:
    """The file or directory a local tracking URI names (None for a server)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):] or ".")
    if uri.startswith("file:"):
        return Path(uri[len("file:"):].removeprefix("//"))
    return None if "://" in uri else Path(uri)


def _mlflow_call(fn: Any, what: str, tracking_uri: str | None) -> Any:
    """``fn()``; an MLflow error (a missing run or experiment, an unreachable server) becomes one
    :class:`RunNotFound` line naming the tracking URI."""
    from mlflow.exceptions import MlflowException

    try:
        return fn()
    except MlflowException as error:
        uri, origin = tracking_uri_in_use(tracking_uri)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunNotFound(f"{what} not found at tracking URI {uri} (from {origin}): {first[:200]}; "
                          "pass --tracking-uri URI or set MLFLOW_TRACKING_URI") from None


def read_mlflow_run(run_id: str, tracking_uri: str | None = None,
                    metrics: Sequence[str] | None = LIFECYCLE_METRICS) -> LoadedRun:
    """One MLflow run: its spectral series, name and params."""
    client = _client(tracking_uri)
    run = _mlflow_call(lambda: client.get_run(run_id), f"MLflow run {run_id}", tracking_uri)
    name = run.info.run_name or run_id
    scalars: Scalars = {}
    for key in run.data.metrics:
        if _wanted(key, metrics):
            scalars[key] = [(int(m.step), float(m.value)) for m in client.get_metric_history(run_id, key)]
    if not scalars:
        raise ValueError(f"MLflow run {run_id} has no spectral_<metric>/<layer_key> metrics")
    return LoadedRun(name, f"{MLFLOW_PREFIX}{run_id}", SpectralHistory.from_scalars(scalars),
                     dict(run.data.params))


def mlflow_experiment_runs(experiments: Iterable[str], tracking_uri: str | None = None) -> list[str]:
    """``mlflow:<run_id>`` specs of every run of the named (or numbered) experiments."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    ids = []
    for name_or_id in experiments:
        experiment = _mlflow_call(lambda n=name_or_id: client.get_experiment_by_name(n),
                                  f"MLflow experiment {name_or_id!r}", tracking_uri)
        if experiment is None:
            try:
                experiment = client.get_experiment(name_or_id)
            except MlflowException:
                experiment = None
        if experiment is None:
            uri, origin = tracking_uri_in_use(tracking_uri)
            raise RunNotFound(f"no MLflow experiment {name_or_id!r} at tracking URI {uri} (from {origin}); "
                              "pass --tracking-uri URI or set MLFLOW_TRACKING_URI")
        ids.append(experiment.experiment_id)
    runs = client.search_runs(experiment_ids=ids, max_results=10_000)
    return [f"{MLFLOW_PREFIX}{run.info.run_id}" for run in runs]


def _wandb_offline_dir(path: Path) -> Path | None:
    """The offline W&B run directory ``path`` is or holds (None when it holds TensorBoard events)."""
    if any(path.glob("run-*.wandb")):
        return path
    if any(path.rglob("*tfevents*")):
        return None
    from .wandb_offline import find_wandb_offline_run

    try:
        return find_wandb_offline_run(path)
    except FileNotFoundError:
        return None


def _series_from_rows(rows: Iterable[Mapping[str, Any]], metrics: Sequence[str] | None) -> Scalars:
    """``{key: [(step, value)]}`` of the spectral series in W&B history rows (x axis ``spectral/step``)."""
    from ..core.keys import STEP_KEY

    out: dict[str, dict[int, float]] = {}
    for row in rows:
        if STEP_KEY not in row or row[STEP_KEY] is None:
            continue
        step = int(row[STEP_KEY])
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and _wanted(key, metrics):
                out.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in out.items()}


def _flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, Mapping) and set(value) == {"value"}:  # W&B's {"value": v} form
            value = value["value"]
        if isinstance(value, Mapping):
            flat.update(_flat_params(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def read_wandb_offline(run_dir: Path, spec: str,
                       metrics: Sequence[str] | None = LIFECYCLE_METRICS) -> LoadedRun:
    """An offline W&B run directory (:mod:`spectral_plugins.runs.wandb_offline`)."""
    from .wandb_offline import read_wandb_offline_run

    run = read_wandb_offline_run(run_dir, wait_for_exit_s=None)
    scalars = _series_from_rows(run.history, metrics)
    if not scalars:
        raise ValueError(f"no spectral_<metric>/<layer_key> series in the W&B run {run_dir}")
    name = run_dir.name.rsplit("-", 1)[-1] if run_dir.name.startswith("offline-run-") else run_dir.name
    return LoadedRun(name, spec, SpectralHistory.from_scalars(scalars), _flat_params(run.config))


def read_wandb_api_run(path: str, metrics: Sequence[str] | None = LIFECYCLE_METRICS) -> LoadedRun:
    """An online W&B run ``<entity>/<project>/<run_id>`` through ``wandb.Api`` (needs a login; not
    reachable from the machine this was built on, so this path is untested)."""
    try:
        import wandb
    except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("reading W&B runs needs wandb: "
                                  "pip install 'spectral-plugins[wandb]'") from error
    try:
        run = wandb.Api().run(path)
        rows = list(run.scan_history())
    except Exception as error:  # noqa: BLE001 - one line, whatever W&B raised
        raise RunNotFound(f"W&B run {path!r} not found or not readable ({type(error).__name__}: {error}); "
                          "give wandb:<entity>/<project>/<run_id> and run `wandb login`") from None
    scalars = _series_from_rows(rows, metrics)
    if not scalars:
        raise ValueError(f"W&B run {path} has no spectral_<metric>/<layer_key> series")
    return LoadedRun(run.name or path, f"{WANDB_PREFIX}{path}", SpectralHistory.from_scalars(scalars),
                     _flat_params(dict(run.config)))
