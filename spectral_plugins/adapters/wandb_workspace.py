"""A saved W&B workspace for spectral runs: multi-line charts per metric x role group, sections in
reading order (``spectral_plugins.wandb.spectral_workspace``; command ``spectral-plugins
wandb-workspace ENTITY/PROJECT``).

W&B's automatic workspace draws one chart per logged key. A workspace definition
(`wandb-workspaces <https://github.com/wandb/wandb-workspaces>`_, the optional extra
``spectral-plugins[wandb-workspaces]``) can put every layer of a role group on one chart instead.
Building the ``wandb_workspaces.workspaces.Workspace`` needs no network; saving it
(``workspace.save()``) needs a W&B login and a reachable server.

Sections, in reading order: the lifecycle maps, the headline lifecycle series, one section per
metric (``spectral_<metric>``) with one line plot per role group whose y keys are every layer of
that group (``spectral_alpha/L00_q``, ``spectral_alpha/L00_k``, ... for ``qk``) plus one for the
matrices outside the blocks, the depth x role heatmaps, and the attention series when present.
Every line plot uses ``spectral/step`` as its x axis.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from ..core.keys import ATTENTION_SECTION, LIFECYCLE_SECTION, STEP_KEY, map_key, matrix_key
from ..core.metrics import DEFAULT_SERIES_METRICS, validate_metric_names
from ..core.model_map import ModelMap, map_model
from ..lifecycle.history import ROLE_GROUPS
from ..runtime.analyses import HEADLINE_ATTENTION, HEADLINE_LIFECYCLE

__all__ = ["WORKSPACE_HINT", "import_workspaces", "spectral_workspace", "add_wandb_workspace_parser"]

WORKSPACE_HINT = "pip install 'spectral-plugins[wandb-workspaces]'"
CHART_GROUPS: tuple[str, ...] = ("qk", "vo", "mlp")
HEATMAP_SECTION = "spectral_heatmap"


def import_workspaces() -> tuple[Any, Any]:
    """``(wandb_workspaces.workspaces, wandb_workspaces.reports.v2)``, or a ModuleNotFoundError saying
    how to install them."""
    try:
        import wandb_workspaces.reports.v2 as reports
        import wandb_workspaces.workspaces as workspaces
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"spectral_workspace needs the wandb-workspaces package: {WORKSPACE_HINT}",
                                  name="wandb_workspaces") from error
    return workspaces, reports


def spectral_workspace(entity: str, project: str, model: Any = None, metrics: Sequence[str] | None = None,
                       name: str = "Spectral lifecycle", attention: bool = False) -> Any:
    """A W&B workspace for the spectral runs of ``entity/project`` (see the module docs).

    Args:
        entity, project: where the workspace is saved.
        model: the model being tracked (an ``nn.Module`` or its :class:`ModelMap`): its layer keys are
            the charts' y keys. None: each chart selects its layers by a key pattern
            (``metric_regex``, e.g. ``spectral_alpha/L\\d+_(q|k)$``), for any model.
        metrics: per-matrix metrics charted (default: alpha and stable rank, what a run publishes by
            default; pass the run's ``metrics=``).
        name: the workspace's (view's) name.
        attention: add a section for the attention series (runs with ``attention=``).

    Returns:
        a ``wandb_workspaces.workspaces.Workspace``; ``.save()`` it (needs a W&B login).

    Raises:
        ModuleNotFoundError: wandb-workspaces is not installed.
        ValueError: an unknown metric name.
    """
    workspaces, reports = import_workspaces()
    model_map = None if model is None else model if isinstance(model, ModelMap) else map_model(model)
    chosen = DEFAULT_SERIES_METRICS if metrics is None else validate_metric_names(list(metrics))

    def lines(title: str, keys: Sequence[str]) -> Any:
        return reports.LinePlot(title=title, x=STEP_KEY, y=list(keys))

    def layer_lines(metric: str) -> list[Any]:
        """One plot per role group (every layer of it), one for the matrices outside the blocks."""
        if model_map is None:
            prefix = re.escape(matrix_key(metric, ""))
            return [reports.LinePlot(title=f"{metric} · {group}", x=STEP_KEY, metric_regex=(
                        rf"^{prefix}L\d+_({'|'.join(ROLE_GROUPS[group])})$")) for group in CHART_GROUPS] + [
                    reports.LinePlot(title=f"{metric} · outside the blocks", x=STEP_KEY,
                                     metric_regex=rf"^{prefix}(embed|pos_embed|lm_head)\w*$")]
        panels = []
        for group in CHART_GROUPS:
            roles = set(ROLE_GROUPS[group])
            keys = [ref.key for ref in sorted(model_map, key=lambda r: (r.depth or 0, r.key))
                    if ref.depth is not None and ref.role in roles]
            if keys:
                panels.append(lines(f"{metric} · {group}", [matrix_key(metric, k) for k in keys]))
        outside = [ref.key for ref in model_map if ref.depth is None]
        if outside:
            panels.append(lines(f"{metric} · {'+'.join(outside)}", [matrix_key(metric, k) for k in outside]))
        return panels

    sections = [workspaces.Section(name="Lifecycle map", is_open=True, panels=[
        reports.MediaBrowser(title=f"{metric} over depth and step", media_keys=[map_key(metric)])
        for metric in ("stable_rank", "alpha")])]
    signals: dict[str, list[str]] = {}
    for key in HEADLINE_LIFECYCLE:
        signals.setdefault(key.split("/")[1], []).append(key)
    sections.append(workspaces.Section(name=LIFECYCLE_SECTION, is_open=True, panels=[
        lines(f"lifecycle · {signal}", keys) for signal, keys in signals.items()]))
    for metric in chosen:
        sections.append(workspaces.Section(name=matrix_key(metric, "").rstrip("/"), is_open=True,
                                           panels=layer_lines(metric)))
    sections.append(workspaces.Section(name=HEATMAP_SECTION, panels=[
        reports.MediaBrowser(title=f"{metric}, depth x role", media_keys=[f"{HEATMAP_SECTION}/{metric}"])
        for metric in ("alpha", "stable_rank") if metric in chosen]))
    if attention:
        sections.append(workspaces.Section(name=ATTENTION_SECTION, panels=[
            reports.LinePlot(title=f"attention · {quantity}", x=STEP_KEY,
                             metric_regex=rf"^{ATTENTION_SECTION}/{quantity}/.*$")
            for quantity in HEADLINE_ATTENTION]))
    return workspaces.Workspace(entity=entity, project=project, name=name, sections=sections)


def add_wandb_workspace_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``spectral-plugins wandb-workspace`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "wandb-workspace", help="save a W&B workspace with the spectral panels of a project",
        description="Build a W&B workspace (sections in reading order, one multi-line chart per metric x "
                    "role group) for the spectral runs of ENTITY/PROJECT and save it (needs `wandb login`).")
    parser.add_argument("project", metavar="ENTITY/PROJECT")
    parser.add_argument("--model", default=None,
                        help="a checkpoint or Hugging Face model dir whose layer keys the charts list "
                             "(default: charts select the layers by a key pattern)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated per-matrix metrics charted (default: alpha,stable_rank)")
    parser.add_argument("--name", default="Spectral lifecycle", help="the workspace's name")
    parser.add_argument("--attention", action="store_true", help="add the attention section")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print the workspace's JSON spec instead of saving it (no login needed)")
    parser.set_defaults(handler=run_wandb_workspace)
    return parser


def run_wandb_workspace(args: argparse.Namespace) -> int:
    """The ``wandb-workspace`` command. Returns the exit status (2 with one line on bad input or a
    failed save)."""
    entity, _, project = args.project.partition("/")
    if not entity or not project or "/" in project:
        print(f"wandb-workspace: give ENTITY/PROJECT, got {args.project!r}")
        return 2
    try:
        model = _model(args.model)
        metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
        workspace = spectral_workspace(entity, project, model, metrics, args.name, args.attention)
    except (ModuleNotFoundError, ValueError, FileNotFoundError) as error:
        print(f"wandb-workspace: {error}")
        return 2
    if args.print_only:
        print(workspace._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1))
        return 0
    try:
        workspace.save()
    except Exception as error:  # noqa: BLE001 - any W&B failure ends in one line, no traceback
        print(f"wandb-workspace: saving to {entity}/{project} failed ({type(error).__name__}: {error}); "
              "run `wandb login` first (or set WANDB_API_KEY) and check that the W&B server is reachable")
        return 2
    print(f"wandb-workspace: saved {workspace.url}")
    return 0


def _model(path: str | None) -> Any:
    if path is None:
        return None
    from ..core.checkpoints import load_model_map

    return load_model_map(path)
