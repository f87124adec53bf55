"""TensorBoard publisher: spectral scalars, a custom-scalars layout, heatmap images, eigenvalue histograms.

A thin translator from :class:`~spectral_plugins.runtime.publishing.StepReport` /
:class:`~spectral_plugins.runtime.publishing.RunSummary` to ``torch.utils.tensorboard.SummaryWriter`` calls.
What it writes (``docs/tensorboard.md`` describes each panel):

- scalars under the canonical keys ``spectral_<metric>/<layer_key>`` (one dashboard section per
  metric) plus the lifecycle / attention extras, at the report's step;
- once per publisher, the whole custom-scalars layout in reading order: the lifecycle category first,
  then one category per metric with one multi-line chart per role group (``alpha · qk`` =
  ``spectral_alpha/L\\d+_(q|k)$``), then attention;
- per step, the lifecycle maps ``spectral_map/<metric>`` (depth x step, wave front drawn over it) and,
  per chosen metric, a depth x role heatmap image ``spectral_heatmap/<metric>`` on a colour scale
  fixed for the whole run;
- optionally (``histograms=True``) the log10-eigenvalue histogram of every matrix whose snapshot
  carries its spectrum, ``spectral_log10_eigenvalues/<layer_key>``;
- at the summary: a markdown text panel ``spectral_summary`` (summary text, final per-layer table,
  every run-level figure) and, for the HParams dashboard, one session in the sub-run
  ``<log_dir>/spectral_run`` with the spectral configuration as hparams and the headline run-level
  figures ``spectral_run/...`` as its metrics (never as series of the main run).

``add_scalars`` is never used (it creates one sub-run directory per line). The tracker is imported
when a publisher is constructed, never when ``spectral_plugins`` is imported.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.heatmap import BLOCK_ROLES
from ..core.keys import ATTENTION_SECTION, LIFECYCLE_SECTION, MATRIX_PREFIX, RUN_SECTION
from ..core.options import metric_list
from ..core.snapshot import Snapshot
from ..lifecycle.history import ROLE_GROUPS
from ..runtime.analyses import HEADLINE_LIFECYCLE, fmt
from ..runtime.publishing import RunSummary, StepReport, flatten_config

__all__ = [
    "HEATMAP_SECTION", "HISTOGRAM_SECTION", "SUMMARY_TAG", "CONFIG_TAG", "HPARAMS_RUN", "LIFECYCLE_CHARTS",
    "require_tensorboard", "TensorBoardPublisher", "custom_scalars_layout", "summary_markdown",
]

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

HEATMAP_SECTION = "spectral_heatmap"
HISTOGRAM_SECTION = "spectral_log10_eigenvalues"
SUMMARY_TAG = "spectral_summary"
CONFIG_TAG = "spectral_config"
HPARAMS_RUN = RUN_SECTION  # the sub-run holding the HParams session
# Per-step lifecycle signals (``spectral_lifecycle/<name>/<group>``) that get a chart in the layout
# even when the first report does not have them yet (most are undefined at the first snapshot), in
# reading order: the wave, the compression, the alpha gradient, the asymmetry.
LIFECYCLE_CHARTS: tuple[str, ...] = tuple(dict.fromkeys(key.split("/")[1] for key in HEADLINE_LIFECYCLE))
# The other per-step signals, charted when the run publishes every series (``series="all"``).
MORE_LIFECYCLE_CHARTS: tuple[str, ...] = (
    "wave_front_speed", "nsr_depth_order", "wave_reversed", "wave_reversal_step")
# Role groups charted per metric, in reading order (a group without matrices gets no chart).
CHART_GROUPS: tuple[str, ...] = ("qk", "vo", "mlp")
# The columns of the final per-layer table, besides the published metrics.
_TABLE_FIELDS = ("key", "depth", "role", "shape")


def require_tensorboard() -> None:
    """Import the tracker; raise ``ModuleNotFoundError`` naming the extra to install when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as error:
        message = (f"TensorBoardPublisher needs the 'tensorboard' package ({error}): "
                   "pip install 'spectral-plugins[tensorboard]'")
        raise ModuleNotFoundError(message, name="tensorboard") from error


class TensorBoardPublisher:
    """Publishes spectral results to a TensorBoard event directory.

    Args:
        log_dir: directory of a new ``SummaryWriter`` (TensorBoard's default ``runs/<time_host>``
            when both this and ``writer`` are None). A ``SummaryWriter`` passed here positionally is
            taken as ``writer``.
        writer: an existing writer, e.g. ``TensorBoardLogger.experiment`` from Lightning. A writer
            passed in is flushed but never closed.
        heatmap_metrics: metrics drawn as a depth x role heatmap image at each step (only those
            that the report publishes).
        histograms: also write a histogram of log10 eigenvalues per matrix, for snapshots taken with
            ``SpectralEngine(keep_eigenvalues=True)``.

    Raises:
        ModuleNotFoundError: TensorBoard is not installed.
        ValueError: an unknown metric in ``heatmap_metrics``.
    """

    name = "tensorboard"

    def __init__(
        self,
        log_dir: str | Path | SummaryWriter | None = None,
        writer: SummaryWriter | None = None,
        heatmap_metrics: Sequence[str] = ("alpha", "stable_rank"),
        histograms: bool = False,
    ) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        if log_dir is not None and not isinstance(log_dir, (str, Path)):
            if writer is not None:
                raise ValueError("pass either a writer positionally or writer=..., not both")
            log_dir, writer = None, log_dir
        if writer is not None and log_dir is not None:
            raise ValueError("pass either log_dir or writer, not both")
        self.heatmap_metrics = metric_list("heatmap_metrics", heatmap_metrics, allow_empty=True)
        self.histograms = histograms
        self._owns_writer = writer is None
        self.writer: SummaryWriter = writer if writer is not None else SummaryWriter(
            log_dir=None if log_dir is None else str(log_dir))
        self._layout_written = False
        self._warned_no_eigenvalues = False

    @property
    def log_dir(self) -> str:
        """Where the event files go (open the view with ``tensorboard --logdir <this>``)."""
        return str(self.writer.get_logdir())

    def publish_config(self, config: Mapping[str, Any]) -> None:
        """Write the configuration as a two-column markdown table (text panel ``spectral_config``)."""
        rows = [(key, str(value)) for key, value in flatten_config(config)]
        self.writer.add_text(CONFIG_TAG, _markdown_table(("setting", "value"), rows), 0)
        self.writer.flush()

    def publish_step(self, report: StepReport) -> None:
        """Scalars, (once) the custom-scalars layout, lifecycle maps, heatmap images and optional
        histograms."""
        step = report.step
        scalars = report.scalars()
        if not report.full:  # a fast-lane step: its scalars only
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            return
        # Draw first, write after: a drawing that fails leaves nothing half-written, so the outbox's
        # retry of this report does not write its scalars twice.
        images = {key: image.to_rgb() for key, image in report.images.items()}
        images.update({f"{HEATMAP_SECTION}/{heatmap.metric}": heatmap.to_rgb()
                       for heatmap in report.heatmaps() if heatmap.metric in self.heatmap_metrics})
        if not self._layout_written:
            self.writer.add_custom_scalars(custom_scalars_layout(report.snapshot, report.metrics, scalars))
            self._layout_written = True
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        for key, rgb in images.items():
            self.writer.add_image(key, rgb, step, dataformats="HWC")
        if self.histograms:
            self._write_histograms(report.snapshot, step)
        self.writer.flush()

    def publish_summary(self, summary: RunSummary) -> None:
        """A markdown text panel with the summary text, the final per-layer table and every run-level
        figure; an HParams session (sub-run ``spectral_run``) with the headline run-level figures."""
        last = summary.last
        self.writer.add_text(SUMMARY_TAG, summary_markdown(summary), last.step)
        headline = summary.headline_scalars()
        if headline:
            hparams = {key: _hparam_value(value) for key, value in flatten_config(summary.config)}
            self.writer.add_hparams(hparams, headline, run_name=HPARAMS_RUN, global_step=last.step)
        self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer only if this publisher created it."""
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()

    def _write_histograms(self, snapshot: Snapshot, step: int) -> None:
        written = False
        for layer in snapshot.layers:
            if layer.eigenvalues is None:
                continue
            values = np.asarray(layer.eigenvalues, dtype=np.float64)
            values = values[np.isfinite(values) & (values > max(layer.precision_floor, 0.0))]
            if values.size:
                self.writer.add_histogram(f"{HISTOGRAM_SECTION}/{layer.key}", np.log10(values), step)
                written = True
        if not written and not self._warned_no_eigenvalues:
            self._warned_no_eigenvalues = True
            warnings.warn("spectral-plugins: TensorBoardPublisher(histograms=True) got a snapshot without "
                          "eigenvalues; take snapshots with SpectralEngine(keep_eigenvalues=True)",
                          RuntimeWarning, stacklevel=3)


def custom_scalars_layout(snapshot: Snapshot, metrics: Iterable[str],
                          scalars: Mapping[str, float] | None = None) -> dict[str, dict[str, list[Any]]]:
    """The whole custom-scalars layout for ``SummaryWriter.add_custom_scalars``.

    In reading order (TensorBoard shows categories in the order written): a ``spectral_lifecycle``
    category with one chart per signal (every role group a line), the headline signals first; one
    category ``spectral_<metric>`` per metric with one multi-line chart per role group present in
    the blocks (``alpha · qk`` over ``spectral_alpha/L\\d+_(q|k)$``: every query and key projection
    over depth; per stack in a model of several stacks: ``alpha · encoder qk``), one for the other
    block roles if any, and one for the matrices outside the blocks (``alpha · embed+lm_head``); a
    ``spectral_attention`` category with one chart per attention quantity found in ``scalars``.
    Chart regexes are matched from the start of the tag (TensorBoard uses ``re.match``).
    """
    scalars = scalars or {}
    stacks = list(dict.fromkeys(la.stack for la in snapshot if la.depth is not None))
    group_regex: dict[str, str] = {}
    for stack in stacks:
        present = {la.role for la in snapshot if la.depth is not None and la.stack == stack}
        label = f"{stack} " if stack else ""
        grouped: set[str] = set()
        for group in CHART_GROUPS:
            roles = [r for r in ROLE_GROUPS[group] if r in present]
            if roles:
                group_regex[label + group] = _roles_regex(snapshot, roles, stack)
                grouped |= set(roles)
        rest = [r for r in BLOCK_ROLES if r in present and r not in grouped]
        if rest:  # cross-attention (cross_q, ...) or roles of no group
            name = "cross" if all(r.startswith("cross_") for r in rest) else "other"
            group_regex[label + name] = _roles_regex(snapshot, rest, stack)
    outside = [la.key for la in snapshot if la.depth is None]
    layout: dict[str, dict[str, list[Any]]] = {}
    seen = {_name_after(key, LIFECYCLE_SECTION) for key in scalars if key.startswith(LIFECYCLE_SECTION + "/")}
    # A first step with more than the headline signals means every series is published: chart the
    # signals that are undefined at the first snapshot too (the layout is written only once).
    more = MORE_LIFECYCLE_CHARTS if seen - set(LIFECYCLE_CHARTS) else ()
    lifecycle = list(dict.fromkeys([*LIFECYCLE_CHARTS, *more, *sorted(seen)]))
    layout[LIFECYCLE_SECTION] = {
        f"lifecycle · {name}": ["Multiline", [f"{LIFECYCLE_SECTION}/{re.escape(name)}(/[^/]+)?$"]]
        for name in lifecycle}
    for metric in metrics:
        prefix = re.escape(f"{MATRIX_PREFIX}{metric}/")
        charts = {f"{metric} · {group}": ["Multiline", [prefix + regex]]
                  for group, regex in group_regex.items()}
        if outside:
            alternatives = "|".join(re.escape(key) for key in outside)
            charts[f"{metric} · {'+'.join(outside)}"] = ["Multiline", [f"{prefix}({alternatives})$"]]
        layout[f"{MATRIX_PREFIX}{metric}"] = charts
    attention = sorted({_name_after(key, ATTENTION_SECTION) for key in scalars
                        if key.startswith(ATTENTION_SECTION + "/")})
    if attention:
        layout[ATTENTION_SECTION] = {
            f"attention · {name}": ["Multiline", [f"{ATTENTION_SECTION}/{re.escape(name)}(/.*)?$"]]
            for name in attention}
    return layout


def summary_markdown(summary: RunSummary) -> str:
    """The summary text followed by the final per-layer table and the summary scalars, in markdown."""
    last = summary.last
    metrics = list(last.metrics)
    rows = []
    for record in last.snapshot.to_records():
        cells = [str(record[f]) for f in _TABLE_FIELDS]
        cells[_TABLE_FIELDS.index("shape")] = "x".join(map(str, record["shape"]))
        rows.append(cells + [_format(record[m]) for m in metrics])
    parts = []
    if summary.text:
        parts.append(summary.text)
    parts.append(f"**Final per-layer metrics (step {last.step})**\n\n"
                 + _markdown_table((*_TABLE_FIELDS, *metrics), rows))
    if summary.summary_scalars:
        parts.append("**Run-level figures**\n\n" + _markdown_table(
            ("key", "value"), [(k, _format(v)) for k, v in summary.summary_scalars.items()]))
    return "\n\n".join(parts)


def _roles_regex(snapshot: Snapshot, roles: Sequence[str], stack: str | None = None) -> str:
    """Layer keys of ``roles`` inside the blocks (of one stack): ``L\\d+_(q|k)$`` (``encoder_L\\d+_(q|k)$``),
    or with the suffix the model map adds when two matrices of one block share a role (``L03_q_c_attn``)."""
    wanted = set(roles)
    keys = [la.key for la in snapshot if la.role in wanted and la.depth is not None and la.stack == stack]
    start = f"{re.escape(stack)}_" if stack else ""
    alternatives = "|".join(re.escape(r) for r in roles)
    if all(re.fullmatch(rf"{start}L\d+_({alternatives})", key) for key in keys):
        return rf"{start}L\d+_({alternatives})$"
    return rf"{start}L\d+_({alternatives})(_\w+)?$"


def _hparam_value(value: Any) -> Any:
    """A value TensorBoard's HParams accepts (numbers, strings, booleans)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _name_after(key: str, section: str) -> str:
    return key[len(section) + 1:].split("/", 1)[0]


def _format(value: Any) -> str:
    return fmt(value) if isinstance(value, float) else str(value)


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])
