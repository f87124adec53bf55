"""Read tracker output back with the trackers' own formats, for tests.

Adapter tests publish through a real tracker and then assert on what the tracker wrote:

- W&B offline runs: :func:`find_wandb_offline_run` and :func:`read_wandb_offline_run`, the package's
  supported reader (:mod:`spectral_plugins.runs.wandb_offline`), re-exported here.
- TensorBoard: ``read_tensorboard_*`` use TensorBoard's ``EventAccumulator`` keeping every event.
- MLflow needs no reader here: use ``MlflowClient`` against the server of ``tests.mlflow_server``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from spectral_plugins.runs.wandb_offline import (  # noqa: F401 - re-exported for the tests
    WandbMetricDefinition,
    WandbOfflineRun,
    find_wandb_offline_run,
    iter_wandb_records,
    read_wandb_offline_run,
    wait_for_wandb_exit,
)

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar.layout_pb2 import Layout

# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------
#
# Every reader looks at ``log_dir`` and every directory below it that holds event files (one
# TensorBoard "run" each; ``add_scalars`` and some loggers create such sub-runs). Tags from event
# files directly in ``log_dir`` keep their name; tags of a sub-run are prefixed with its path
# relative to ``log_dir`` (``"loss_train/loss"``), as TensorBoard shows run and tag. A name
# produced by two runs raises ``ValueError``.

CUSTOM_SCALARS_TAG = "custom_scalars__config__"
_T = TypeVar("_T")


def tensorboard_runs(log_dir: Path) -> dict[str, EventAccumulator]:
    """Load every run below ``log_dir`` keeping all events (``size_guidance`` 0 for every kind).

    Keys are the run paths relative to ``log_dir`` (``""`` for ``log_dir`` itself), sorted.
    """
    from tensorboard.backend.event_processing import event_accumulator, io_wrapper

    keep_all = dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0)
    runs: dict[str, EventAccumulator] = {}
    for dirpath, _, filenames in sorted(os.walk(log_dir)):
        if any(io_wrapper.IsTensorFlowEventsFile(name) for name in filenames):
            rel = Path(dirpath).relative_to(log_dir).as_posix()
            accumulator = event_accumulator.EventAccumulator(dirpath, size_guidance=keep_all)
            runs["" if rel == "." else rel] = accumulator.Reload()
    if not runs:
        raise FileNotFoundError(f"no TensorBoard event files below {log_dir}")
    return runs


def _by_tag(log_dir: Path, kind: str, read: Callable[[EventAccumulator, str], _T]) -> dict[str, _T]:
    """Collect ``read(accumulator, tag)`` for every tag of one kind across all runs."""
    out: dict[str, _T] = {}
    for run, accumulator in tensorboard_runs(log_dir).items():
        for tag in accumulator.Tags()[kind]:
            name = f"{run}/{tag}" if run else tag
            if name in out:
                raise ValueError(f"{name!r} is produced by two TensorBoard runs below {log_dir}")
            out[name] = read(accumulator, tag)
    return out


def read_tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> ``[(step, value), ...]`` in write order. Values were stored as float32."""
    return _by_tag(log_dir, "scalars", lambda acc, tag: [(e.step, e.value) for e in acc.Scalars(tag)])


def read_tensorboard_images(log_dir: Path) -> dict[str, list[tuple[int, bytes]]]:
    """Tag -> ``[(step, encoded image bytes), ...]`` (PNG for ``SummaryWriter.add_image``)."""
    return _by_tag(
        log_dir,
        "images",
        lambda acc, tag: [(e.step, e.encoded_image_string) for e in acc.Images(tag)],
    )


def read_tensorboard_histograms(log_dir: Path) -> dict[str, list[int]]:
    """Tag -> steps at which a histogram was written."""
    return _by_tag(log_dir, "histograms", lambda acc, tag: [e.step for e in acc.Histograms(tag)])


def read_tensorboard_custom_scalars_layouts(log_dir: Path) -> dict[str, list[Layout]]:
    """Run -> every custom-scalars layout written to it, in write order.

    ``SummaryWriter.add_custom_scalars`` writes a tensor summary with tag
    ``custom_scalars__config__``, plugin name ``custom_scalars``, dtype ``DT_STRING`` and the
    serialised ``Layout`` as its single ``string_val``, at step 0.
    """
    from tensorboard.plugins.custom_scalar.layout_pb2 import Layout

    layouts: dict[str, list[Layout]] = {}
    for run, accumulator in tensorboard_runs(log_dir).items():
        if CUSTOM_SCALARS_TAG in accumulator.Tags()["tensors"]:
            events = accumulator.Tensors(CUSTOM_SCALARS_TAG)
            layouts[run] = [Layout.FromString(e.tensor_proto.string_val[0]) for e in events]
    return layouts


def read_tensorboard_custom_scalars_layout(log_dir: Path) -> Layout | None:
    """Return the layout TensorBoard's Custom Scalars dashboard shows (``None`` if none).

    Mirrors the plugin: per run the last layout written wins; runs (sorted by name) are merged
    by category title, charts already present in a category are not repeated.
    """
    from tensorboard.plugins.custom_scalar.layout_pb2 import Layout

    merged: Layout | None = None
    by_title: dict[str, Any] = {}
    for layouts in read_tensorboard_custom_scalars_layouts(log_dir).values():
        layout = layouts[-1]
        if merged is None:
            merged = Layout()
            merged.CopyFrom(layout)
            by_title = {category.title: category for category in merged.category}
            continue
        for category in layout.category:
            if category.title in by_title:
                known = by_title[category.title].chart
                known.extend([chart for chart in category.chart if chart not in known])
            else:
                by_title[category.title] = merged.category.add()
                by_title[category.title].CopyFrom(category)
    return merged


def flatten_custom_scalars_layout(layout: Layout) -> dict[str, dict[str, list[str]]]:
    """``{category title: {chart title: [tag regexes]}}``.

    A multiline chart gives its tag regexes; a margin chart gives ``value, lower, upper`` of each
    series in turn.
    """
    flat: dict[str, dict[str, list[str]]] = {}
    for category in layout.category:
        charts = flat.setdefault(category.title, {})
        for chart in category.chart:
            if chart.WhichOneof("content") == "margin":
                tags = [t for s in chart.margin.series for t in (s.value, s.lower, s.upper)]
            else:
                tags = list(chart.multiline.tag)
            charts[chart.title] = tags
    return flat
