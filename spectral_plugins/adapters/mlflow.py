"""MLflow publisher: spectral metrics with steps, configuration as params, heatmaps and the final
snapshot as artifacts.

A thin translator from :class:`~spectral_plugins.runtime.publishing.StepReport` /
:class:`~spectral_plugins.runtime.publishing.RunSummary` to ``MlflowClient`` calls (``docs/mlflow.md``
describes every key and artifact):

- per step, every canonical scalar (``spectral_<metric>/<layer_key>``, ``spectral_lifecycle/...``)
  as a metric at the report's step, through ``log_batch`` in chunks of at most 1000 metrics;
- per step and chosen metric, a heatmap PNG ``spectral/heatmaps/<metric>/step_000123.png``;
- per step, the lifecycle maps ``spectral/maps/<metric>.png``, replaced in place (the artifact is
  always the map up to the latest snapshot; the summary writes the final one);
- the configuration as params ``spectral/<key>`` (stringified, cut to MLflow's 6000 characters);
- at the summary: the final per-layer figures (the last step's metrics, so their latest value is
  the final one: MLflow's run comparison and ``search_runs`` use each metric's latest value), the
  headline run-level figures as metrics ``spectral_run/...`` (one section in the UI, one value per
  run: what the runs table and the compare view sort on), every run-level figure in
  ``spectral/run_summary.json``, ``spectral/final_snapshot.json`` and ``spectral/summary.md``.

A dead or stuck server never blocks for long (the tracker calls this publisher from its outbox, off
the training thread, and retries a failed call later): every MLflow call runs on one daemon worker
thread and the publisher waits at most ``timeout_s`` for it (raising ``TimeoutError``). On that
thread MLflow's HTTP requests are bounded too: no retries of their own and a request timeout of
``timeout_s`` (MLflow's defaults, 7 retries and 120 s, block a call to a dead server for minutes);
the user's ``MLFLOW_HTTP_REQUEST_*`` settings still apply on every other thread. While a timed-out
call is still running, later calls fail at once instead of queueing behind it. A run the publisher
created is ended FINISHED after the summary, FAILED when it is closed without one.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.options import metric_list
from ..runtime.publishing import RunSummary, StepReport, flatten_config

__all__ = [
    "MAX_METRICS_PER_BATCH", "MAX_PARAMS_PER_BATCH", "MAX_PARAM_VALUE_LENGTH", "MAX_KEY_LENGTH",
    "PARAM_PREFIX", "ARTIFACT_DIR", "HEATMAP_DIR", "MAP_DIR", "FINAL_SNAPSHOT", "SUMMARY_TEXT",
    "RUN_SUMMARY", "require_mlflow", "heatmap_artifact_path", "map_artifact_path", "MlflowPublisher",
    "config_params", "summary_text",
]

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow's limits (mlflow.utils.validation, 3.x): a log_batch call takes at most 1000 metrics and
# 100 params, 1000 entities in all; a param value at most 6000 characters, a key 250.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
PARAM_PREFIX = "spectral/"
ARTIFACT_DIR = "spectral"
HEATMAP_DIR = f"{ARTIFACT_DIR}/heatmaps"
MAP_DIR = f"{ARTIFACT_DIR}/maps"
FINAL_SNAPSHOT = f"{ARTIFACT_DIR}/final_snapshot.json"
SUMMARY_TEXT = f"{ARTIFACT_DIR}/summary.md"
RUN_SUMMARY = f"{ARTIFACT_DIR}/run_summary.json"

_T = TypeVar("_T")


def require_mlflow() -> None:
    """Import the tracker; raise ``ModuleNotFoundError`` naming the extra to install when it is missing."""
    try:
        import mlflow  # noqa: F401
    except ImportError as error:
        raise ModuleNotFoundError(f"MlflowPublisher needs the 'mlflow' package ({error}): "
                                  "pip install 'spectral-plugins[mlflow]'", name="mlflow") from error


def heatmap_artifact_path(metric: str, step: int) -> str:
    """``spectral/heatmaps/<metric>/step_000123.png``: zero-padded so that names sort by step."""
    return f"{HEATMAP_DIR}/{metric}/step_{step:06d}.png"


def map_artifact_path(image_key: str) -> str:
    """``spectral_map/<metric>`` -> ``spectral/maps/<metric>.png`` (one file, replaced at each step)."""
    return f"{MAP_DIR}/{image_key.split('/', 1)[-1]}.png"


class MlflowPublisher:
    """Publishes spectral results to an MLflow run.

    The run is, in order: ``run_id``; else the active fluent run (``mlflow.active_run()``); else a
    run this publisher creates on its first call (in ``experiment_name``, else the experiment named
    by ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``, else the default experiment "0") and
    ends on :meth:`close`. A run it did not create is never ended.

    Args:
        run_id: an existing run, e.g. ``MLFlowLogger.run_id`` from Lightning.
        client: an ``MlflowClient``, e.g. ``MLFlowLogger.experiment``; by default one for
            ``tracking_uri`` (else MLflow's current tracking URI).
        tracking_uri: where to log when no client is given.
        heatmap_metrics: metrics whose depth x role heatmap is logged as a PNG artifact each step.
        timeout_s: the longest a publisher call waits for MLflow (all its requests together).
        experiment_name: experiment of a run this publisher creates (created if missing).
        run_name: name of a run this publisher creates.

    Raises:
        ModuleNotFoundError: MLflow is not installed.
        ValueError: an unknown metric in ``heatmap_metrics`` or a non-positive ``timeout_s``.
    """

    name = "mlflow"

    def __init__(
        self,
        run_id: str | None = None,
        client: MlflowClient | None = None,
        tracking_uri: str | None = None,
        heatmap_metrics: Sequence[str] = ("alpha", "stable_rank"),
        timeout_s: float = 10.0,
        experiment_name: str | None = None,
        run_name: str | None = None,
    ) -> None:
        require_mlflow()
        import mlflow

        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r}; it must be positive")
        self.heatmap_metrics = metric_list("heatmap_metrics", heatmap_metrics, allow_empty=True)
        self.timeout_s = float(timeout_s)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.owns_run = False
        if run_id is None and (active := mlflow.active_run()) is not None:
            run_id = active.info.run_id
            if client is None and tracking_uri is None:
                tracking_uri = mlflow.get_tracking_uri()
        self.run_id: str | None = run_id
        # Created here, outside the deadline: for a new sqlite store this runs its migrations (seconds,
        # local); for a server it sends no request.
        self.client: MlflowClient = client if client is not None else mlflow.MlflowClient(tracking_uri)
        self._params: dict[str, str] = {}
        self._last_published_step: int | None = None
        self._worker = _DeadlineWorker(f"spectral-plugins-mlflow-{id(self):x}", self.timeout_s)
        self._summarized = False
        self._closed = False

    def publish_config(self, config: Mapping[str, Any]) -> None:
        """Log the configuration as params ``spectral/<key>`` (nested keys joined by ``/``).

        MLflow params are write-once: a key already logged by this publisher is skipped.
        """
        params = config_params(config)
        self._call(lambda: self._log_params(params))

    def publish_step(self, report: StepReport) -> None:
        """Log the report's scalars at its step and the chosen heatmaps as PNG artifacts."""
        timestamp = _now_ms()
        metrics = report.scalars()
        images = {heatmap_artifact_path(h.metric, report.step): h.to_png()
                  for h in report.heatmaps() if h.metric in self.heatmap_metrics}
        images.update({map_artifact_path(key): image.to_png() for key, image in report.images.items()})

        def work() -> None:
            self._log_metrics(metrics, report.step, timestamp)
            self._log_files(images)

        self._call(work)
        if report.full:
            self._last_published_step = report.step

    def publish_summary(self, summary: RunSummary) -> None:
        """Final figures and the headline run-level figures as metrics at the last step; the final
        maps, the final snapshot (JSON), every run-level figure (JSON) and the summary text as
        artifacts; the configuration as params if not logged yet."""
        last = summary.last
        timestamp = _now_ms()
        metrics = {} if self._last_published_step == last.step else last.scalars()
        metrics.update(summary.headline_scalars())
        params = config_params(summary.config)
        files = {FINAL_SNAPSHOT: last.snapshot.to_json(indent=1).encode(),
                 SUMMARY_TEXT: summary_text(summary).encode(),
                 RUN_SUMMARY: json.dumps({"step": last.step, **summary.finite_scalars()}, indent=1).encode()}
        files.update({map_artifact_path(key): image.to_png() for key, image in last.images.items()})

        def work() -> None:
            self._log_params(params)
            self._log_metrics(metrics, last.step, timestamp)
            self._log_files(files)

        self._call(work)
        self._summarized = True

    def close(self) -> None:
        """End the run if this publisher created it: FINISHED after the summary, else FAILED (bounded
        by ``timeout_s`` like every call; a failed close may be called again)."""
        if self._closed:
            return
        if self.owns_run and self.run_id is not None:
            run_id, status = self.run_id, "FINISHED" if self._summarized else "FAILED"
            self._call(lambda: self.client.set_terminated(run_id, status))
        self._closed = True

    # ----------------------------------------------------------------------------------------
    # On the worker thread

    def _call(self, work: Callable[[], _T]) -> _T:
        def with_run() -> _T:
            self._ensure_run()
            return work()

        return self._worker.call(with_run, self.timeout_s)

    def _ensure_run(self) -> str:
        if self.run_id is None:
            experiment_id = self._experiment_id()
            run = self.client.create_run(experiment_id, run_name=self.run_name)
            self.run_id = run.info.run_id
            self.owns_run = True
        return self.run_id

    def _experiment_id(self) -> str:
        name = self.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name is None:
            return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else self.client.create_experiment(name)

    def _log_metrics(self, values: Mapping[str, float], step: int, timestamp: int) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, timestamp, step) for key, value in values.items()]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._ensure_run(), metrics=chunk)

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new = {k: v for k, v in params.items() if k not in self._params}
        for chunk in _chunks([Param(k, v) for k, v in new.items()], MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self._ensure_run(), params=chunk)
        self._params.update(new)

    def _log_files(self, files: Mapping[str, bytes]) -> None:
        """Upload ``{artifact path: content}`` in one ``log_artifacts`` call from a temp dir."""
        if not files:
            return
        with tempfile.TemporaryDirectory(prefix="spectral_mlflow_") as root:
            for relative, content in files.items():
                path = Path(root, relative)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            self.client.log_artifacts(self._ensure_run(), root)


def config_params(config: Mapping[str, Any], prefix: str = PARAM_PREFIX) -> dict[str, str]:
    """``{spectral/<key>: str(value)}`` with nested mappings flattened (``spectral/a/b``), values
    cut to MLflow's param length and keys to its key length."""
    return {name[:MAX_KEY_LENGTH]: _param_value(value) for name, value in flatten_config(config, prefix)}


def summary_text(summary: RunSummary) -> str:
    """Markdown: the summary text, then the final per-layer table of the published metrics."""
    last = summary.last
    metrics = list(last.metrics)
    header = ["key", "depth", "role", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layer in last.snapshot.layers:
        cells = [layer.key, str(layer.depth), layer.role, *(f"{layer.metric(m):.4g}" for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    intro = f"{summary.text}\n\n" if summary.text else ""
    return f"{intro}Final per-layer metrics (step {last.step})\n\n{table}\n"


def _param_value(value: Any) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    return text[:MAX_PARAM_VALUE_LENGTH]


def _chunks(items: list[_T], size: int) -> Iterable[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


class _DeadlineWorker:
    """Runs callables one at a time on a daemon thread; callers wait at most a deadline.

    A daemon thread (not a ``ThreadPoolExecutor``, whose threads are joined at interpreter exit)
    so that a call stuck in MLflow's retries cannot delay the end of the program either.
    """

    def __init__(self, name: str, timeout_s: float) -> None:
        self._name = name
        self._timeout_s = timeout_s
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._late: concurrent.futures.Future[Any] | None = None

    def call(self, fn: Callable[[], _T], timeout_s: float) -> _T:
        """Run ``fn`` on the worker and return its result (or raise its exception).

        Raises:
            TimeoutError: ``fn`` did not finish within ``timeout_s`` (it keeps running in the
                background), or an earlier call that timed out is still running.
        """
        if self._late is not None and not self._late.done():
            raise TimeoutError("an earlier MLflow call is still running past its deadline; skipped")
        self._late = None
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._queue.put((fn, future))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            if future.done():  # fn itself raised a TimeoutError
                raise
            self._late = future
            raise TimeoutError(f"MLflow did not answer within {timeout_s:g} s (is the tracking server "
                               "reachable?); training continues") from None

    def _run(self) -> None:
        _bound_http_requests(retries=0, timeout_s=max(1, math.ceil(self._timeout_s)))
        while True:
            fn, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(error)


# MLflow reads its HTTP settings from the environment at every request, process-wide. These
# per-thread values let the publisher's worker bound its own requests without changing the user's.
_HTTP_BOUNDS = threading.local()
_HTTP_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def _bound_http_requests(retries: int, timeout_s: int) -> None:
    """On the calling thread only: MLflow's HTTP requests make ``retries`` retries and time out after
    ``timeout_s`` seconds. Elsewhere the settings stay what the user's environment says."""
    from mlflow import environment_variables

    for name, value in zip(_HTTP_SETTINGS, (retries, timeout_s)):
        setattr(_HTTP_BOUNDS, name, value)
        variable = getattr(environment_variables, name, None)
        if variable is None or getattr(variable, "_spectral_per_thread", False):
            continue
        default = variable.get

        def per_thread(name: str = name, default: Callable[[], Any] = default) -> Any:
            value = getattr(_HTTP_BOUNDS, name, None)
            return default() if value is None else value

        variable.get = per_thread  # an instance attribute: shadows the class's method for this setting
        variable._spectral_per_thread = True
