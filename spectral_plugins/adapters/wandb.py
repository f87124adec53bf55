"""Weights & Biases publisher: spectral series, heatmaps, per-layer tables and depth charts in a W&B run.

Panels (keys follow :mod:`spectral_plugins.core.keys`; the W&B workspace makes one section per prefix
before the first ``/``):

- ``spectral_<metric>/<layer>``: one line chart per matrix and metric, x axis ``spectral/step`` (the
  training step, logged inside each row), run summary ``min`` for the rank metrics, else ``last``;
- ``spectral_lifecycle/...`` and ``spectral_attention/...``: the analyses' scalars, same x axis;
- ``spectral_map/<metric>``: the lifecycle map (depth x step, wave front over it) per snapshot;
- ``spectral_heatmap/<metric>``: a depth x role heatmap image per snapshot (step slider), on one
  colour scale for the whole run;
- ``spectral_table/layers``: a table of the latest per-layer metrics (``spectral_table/<name>`` for
  the analyses' tables, such as per-head attention bounds), every ``media_every`` snapshots;
- ``spectral_depth/<metric>``: a line-series chart of the metric over depth, one line per role, for
  the latest snapshot, every ``media_every`` snapshots;
- the run summary: every run-level figure ``spectral_run/...``, the summary text
  (``spectral_summary/text``) and the final per-layer table (``spectral_summary/layers``); the
  configuration under ``config.spectral``.

``wandb`` is imported when a publisher is created; it works the same in offline mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.keys import STEP_KEY
from ..core.metrics import METRICS
from ..core.options import metric_list, positive_int
from ..runtime.publishing import RunSummary, StepReport
from .wandb_workspace import spectral_workspace

__all__ = [
    "spectral_workspace", "INSTALL_HINT", "HEATMAP_SECTION", "TABLE_SECTION", "DEPTH_SECTION",
    "SUMMARY_SECTION", "CONFIG_KEY", "LINE_SERIES_TABLE_SUFFIX", "import_wandb", "summary_kind",
    "WandbPublisher",
]

INSTALL_HINT = "pip install 'spectral-plugins[wandb]'"
HEATMAP_SECTION = "spectral_heatmap"
TABLE_SECTION = "spectral_table"
DEPTH_SECTION = "spectral_depth"
SUMMARY_SECTION = "spectral_summary"
CONFIG_KEY = "spectral"
# wandb.plot.line_series logs its data under "<key>_table".
LINE_SERIES_TABLE_SUFFIX = "_table"


def import_wandb() -> Any:
    """The ``wandb`` module, or a ModuleNotFoundError saying how to install it."""
    try:
        import wandb
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"spectral_plugins.wandb needs the wandb package: {INSTALL_HINT}") from error
    return wandb


def summary_kind(key: str) -> str:
    """The run-summary aggregate of a scalar key: the metric's own (``min`` for the rank metrics,
    see :data:`~spectral_plugins.core.metrics.METRICS`), ``last`` for everything else."""
    section = key.split("/", 1)[0]
    spec = METRICS.get(section.removeprefix("spectral_")) if section.startswith("spectral_") else None
    return spec.summary if spec is not None else "last"


class WandbPublisher:
    """Publishes spectral reports to a W&B run.

    Args:
        run: the run to log to (default: ``wandb.run``, looked up at each call, so the publisher may
            be created before ``wandb.init``). The publisher never finishes a run.
        heatmap_metrics: metrics whose heatmap images to log (default None: every heatmap the report
            offers; ``()``: none).
        table: log ``spectral_table/layers`` (the latest per-layer metrics) at each snapshot.
        depth_plots: metrics to chart over depth (True: every published metric; False: none).
        media_every: log the tables and depth charts at every ``media_every``-th snapshot (1: each
            one) and at the end of the run. Each costs a W&B table file per snapshot, so a long run
            with many snapshots may want 5 or 10; images are logged at every snapshot.

    Raises:
        ModuleNotFoundError: wandb is not installed.
        ValueError: ``media_every < 1``.
    """

    name = "wandb"

    def __init__(
        self,
        run: Any = None,
        heatmap_metrics: Sequence[str] | None = None,
        table: bool = True,
        depth_plots: bool | Sequence[str] = True,
        media_every: int = 1,
    ) -> None:
        positive_int("media_every", media_every)
        self._wandb = import_wandb()
        self._run = run
        self.heatmap_metrics = None if heatmap_metrics is None else metric_list(
            "heatmap_metrics", heatmap_metrics, allow_empty=True)
        self.table = table
        self.depth_plots = depth_plots if isinstance(depth_plots, bool) else metric_list(
            "depth_plots", depth_plots, allow_empty=True)
        self.media_every = media_every
        self._snapshots = 0
        self._media_step: int | None = None  # the step of the last tables and depth charts
        self._defined: set[str] = set()
        self._defined_for: Any = None

    @property
    def run(self) -> Any:
        """The run logged to; raises RuntimeError when there is none."""
        run = self._run if self._run is not None else self._wandb.run
        if run is None:
            raise RuntimeError("no active W&B run: call wandb.init(...) first, or pass "
                               "WandbPublisher(run=...)")
        return run

    # ------------------------------------------------------------------ protocol
    def publish_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update({CONFIG_KEY: dict(config)}, allow_val_change=True)

    def publish_step(self, report: StepReport) -> None:
        run = self.run
        row: dict[str, Any] = {STEP_KEY: report.step, **report.scalars()}
        if not report.full:  # a fast-lane step: its scalars only
            self._define(run, row)
            run.log(row)
            return
        row.update({key: self._wandb.Image(image.to_rgb(), caption=f"{key} up to step {report.step}")
                    for key, image in report.images.items()})
        row.update(self._heatmaps(report))
        if self._snapshots % self.media_every == 0:
            row.update(self._media(report))
        self._snapshots += 1
        self._define(run, row)
        run.log(row)

    def publish_summary(self, summary: RunSummary) -> None:
        run = self.run
        if self._media_step != summary.last.step and self._snapshots:  # the end of the run always has them
            row = {STEP_KEY: summary.last.step, **self._media(summary.last)}
            self._define(run, row)
            run.log(row)
        run.summary.update({**summary.finite_scalars(), f"{SUMMARY_SECTION}/text": summary.text,
                            f"{SUMMARY_SECTION}/step": summary.last.step,
                            f"{SUMMARY_SECTION}/layers": self._layer_table(summary.last)})

    def close(self) -> None:
        """Nothing to release: the run belongs to the caller (or to Lightning's WandbLogger)."""

    # ------------------------------------------------------------------ panels
    def _media(self, report: StepReport) -> dict[str, Any]:
        """The tables and depth charts of a report (the heavy media)."""
        media: dict[str, Any] = {}
        if self.table:
            media[f"{TABLE_SECTION}/layers"] = self._layer_table(report)
        for name, rows in report.tables.items():
            media[f"{TABLE_SECTION}/{name}"] = self._rows_table(rows)
        media.update(self._depth_plots(report))
        self._media_step = report.step
        return media

    def _define(self, run: Any, row: Mapping[str, Any]) -> None:
        """Exact-key ``define_metric`` for each new key: WandbLogger's ``"*"`` glob comes first and a
        later glob would be ignored, and ``run.log(step=...)`` would drop rows below the run's step."""
        if self._defined_for is not run:
            self._defined, self._defined_for = set(), run
            run.define_metric(STEP_KEY)
            self._defined.add(STEP_KEY)
        for key, value in row.items():
            if key in self._defined:
                continue
            if isinstance(value, (int, float)):
                run.define_metric(key, step_metric=STEP_KEY, summary=summary_kind(key))
            else:
                name = key + LINE_SERIES_TABLE_SUFFIX if key.startswith(DEPTH_SECTION + "/") else key
                run.define_metric(name, step_metric=STEP_KEY)
            self._defined.add(key)

    def _heatmaps(self, report: StepReport) -> dict[str, Any]:
        wandb = self._wandb
        images = {}
        for heatmap in report.heatmaps():
            if self.heatmap_metrics is not None and heatmap.metric not in self.heatmap_metrics:
                continue
            caption = f"{heatmap.metric}, depth x role, step {report.step}"
            images[f"{HEATMAP_SECTION}/{heatmap.metric}"] = wandb.Image(heatmap.to_rgb(), caption=caption)
        return images

    def _layer_table(self, report: StepReport) -> Any:
        columns = ["step", "layer", "name", "depth", "role", "rows", "cols", *report.metrics]
        data = [[report.step, layer.key, layer.name, -1 if layer.depth is None else layer.depth, layer.role,
                 layer.shape[0], layer.shape[1], *(_json_float(layer.metric(m)) for m in report.metrics)]
                for layer in report.snapshot.layers]
        return self._wandb.Table(columns=columns, data=data)

    def _rows_table(self, rows: list[dict[str, Any]]) -> Any:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        data = [[_json_value(row.get(column)) for column in columns] for row in rows]
        return self._wandb.Table(columns=columns, data=data)

    def _depth_plots(self, report: StepReport) -> dict[str, Any]:
        if self.depth_plots is False:
            return {}
        wanted = report.metrics if self.depth_plots is True else tuple(self.depth_plots)
        block_layers = [layer for layer in report.snapshot.layers if layer.depth is not None]
        if not block_layers:
            return {}
        roles = list(dict.fromkeys(layer.role for layer in block_layers))
        plots = {}
        for metric in wanted:
            xs, ys, keys = [], [], []
            for role in roles:
                points = sorted((layer.depth, layer.metric(metric)) for layer in block_layers
                                if layer.role == role and math.isfinite(layer.metric(metric)))
                if points:
                    xs.append([p[0] for p in points])
                    ys.append([p[1] for p in points])
                    keys.append(role)
            if keys:
                plots[f"{DEPTH_SECTION}/{metric}"] = self._wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, title=f"{metric} over depth (latest snapshot)", xname="depth")
        return plots


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_value(value: Any) -> Any:
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)
