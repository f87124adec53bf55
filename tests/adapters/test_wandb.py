"""WandbPublisher against real offline W&B runs, read back from the run's own record log."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from spectral_plugins.core.keys import STEP_KEY
from spectral_plugins.core.metrics import DEFAULT_SERIES_METRICS
from spectral_plugins.demo.model import CharGPT, GPTConfig
from spectral_plugins.runtime.tracker import SpectralTracker
from spectral_plugins.wandb import WandbPublisher, summary_kind
from tests.runtime.test_tracker import TINY, RecordingPublisher, train
from tests.tracker_readers import WandbOfflineRun, find_wandb_offline_run, read_wandb_offline_run


def set_wandb_env(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Offline and quiet, every W&B directory below ``root``."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                        "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_META": "true"}.items():
        monkeypatch.setenv(name, value)
    for name in ("CACHE", "CONFIG", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(root / name.lower()))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def wandb_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    set_wandb_env(monkeypatch, tmp_path)
    yield tmp_path
    reset_wandb()


def reset_wandb() -> None:
    """Finish any run and drop W&B's process-wide settings: ``wandb.setup`` reads the ``WANDB_*``
    environment once per process, so later tests setting other directories would be ignored."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def published_run(root: Path, lightning_style: bool,
                  media_every: int = 1) -> tuple[WandbOfflineRun, RecordingPublisher, Any]:
    """Train the tiny model 10 steps with a tracker publishing to W&B every 5 steps."""
    import wandb

    run = wandb.init(mode="offline", dir=root, project="spectral-tests")
    if lightning_style:  # what WandbLogger does first; a later glob of ours would be ignored
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        run.log({"train/loss": 1.0}, step=50)  # the run's step is now far ahead of our snapshots
    recorder = RecordingPublisher()
    model = CharGPT(TINY)
    publishers = [WandbPublisher(media_every=media_every), recorder]
    tracker = SpectralTracker(model, every_n_steps=5, publishers=publishers,
                              attention={"sample_batch": torch.randint(0, TINY.vocab_size, (2, 16))})
    tracker.step(0)
    train(model, tracker, range(10))
    tracker.finish()
    run.finish()
    return read_wandb_offline_run(find_wandb_offline_run(root)), recorder, tracker


@pytest.mark.slow
@pytest.mark.parametrize("lightning_style", [False, True], ids=["plain", "after-wandblogger-globs"])
def test_series_definitions_and_summary_read_back(wandb_root: Path, lightning_style: bool) -> None:
    read, recorder, tracker = published_run(wandb_root, lightning_style)
    rows = {row[STEP_KEY]: row for row in read.history if STEP_KEY in row}
    assert sorted(rows) == [r.step for r in recorder.reports] == [0, 5, 10]
    for report in recorder.reports:
        row = rows[report.step]
        scalars = report.scalars()
        assert {k: row[k] for k in scalars} == scalars  # every value, exactly (JSON round trip)
        assert any(k.startswith("spectral_attention/") for k in scalars)

    definitions = {d.name: d for d in read.metric_definitions if d.name}
    assert STEP_KEY in definitions
    for key in recorder.reports[-1].scalars():
        definition = definitions[key]
        assert (definition.step_metric, definition.glob_name) == (STEP_KEY, "")
        assert definition.summary == (summary_kind(key),)
    assert definitions["spectral_stable_rank/L00_q"].summary == ("min",)
    assert definitions["spectral_stable_rank/lm_head"].summary == ("min",)
    assert summary_kind("spectral_effective_rank/lm_head") == "min"
    assert definitions["spectral_alpha/L01_v"].summary == ("last",)
    assert summary_kind("spectral_lifecycle/delta_alpha/qk") == "last"

    last = recorder.reports[-1].scalars()
    assert read.summary["spectral_alpha/L01_v"] == {"last": last["spectral_alpha/L01_v"]}
    ranks = [r.scalars()["spectral_stable_rank/L00_q"] for r in recorder.reports]
    assert read.summary["spectral_stable_rank/L00_q"] == {"min": min(ranks)}
    summary = recorder.summaries[0]  # every run-level figure is in the summary, none is a series
    assert summary.summary_scalars and all(read.summary[k] == v for k, v in summary.summary_scalars.items())
    assert len(summary.summary_scalars) > len(summary.headline_scalars())
    assert not any(k.startswith("spectral_run/") for row in read.history for k in row)
    assert read.summary["spectral_summary/text"] == summary.text
    assert read.summary["spectral_summary/step"] == 10
    assert read.config["spectral"] == tracker.config()
    assert read.exit_code == 0


@pytest.mark.slow
def test_maps_heatmaps_tables_and_depth_charts(wandb_root: Path) -> None:
    read, recorder, _ = published_run(wandb_root, lightning_style=False, media_every=2)
    files = read.run_dir / "files"
    rows = [row for row in read.history if STEP_KEY in row]
    last_report = recorder.reports[-1]
    for metric in ("alpha", "stable_rank"):  # the lifecycle map, redrawn at every snapshot
        images = [row[f"spectral_map/{metric}"] for row in rows]
        assert len(images) == 3
        saved = np.asarray(Image.open(files / images[-1]["path"]).convert("RGB"))
        assert np.array_equal(saved, last_report.images[f"spectral_map/{metric}"].to_rgb())
    # media_every=2: tables and depth charts at the 1st and 3rd snapshot (steps 0 and 10) only
    assert [row[STEP_KEY] for row in rows if "spectral_table/layers" in row] == [0, 10]
    assert [row[STEP_KEY] for row in rows if "spectral_depth/alpha_table" in row] == [0, 10]
    for metric in ("alpha", "stable_rank"):
        images = [row[f"spectral_heatmap/{metric}"] for row in rows]
        assert len(images) == 3 and all(image["_type"] == "image-file" for image in images)
        [heatmap] = [h for h in last_report.heatmaps() if h.metric == metric]
        saved = np.asarray(Image.open(files / images[-1]["path"]).convert("RGB"))
        assert np.array_equal(saved, heatmap.to_rgb())

    table = json.loads((files / rows[-1]["spectral_table/layers"]["path"]).read_text())
    assert table["columns"][:5] == ["step", "layer", "name", "depth", "role"]
    by_layer = {row[1]: dict(zip(table["columns"], row)) for row in table["data"]}
    for layer in last_report.snapshot.layers:
        for metric in last_report.metrics:
            value = layer.metric(metric)
            assert by_layer[layer.key][metric] == (value if math.isfinite(value) else None)
    heads = json.loads((files / rows[-1]["spectral_table/attention_heads"]["path"]).read_text())
    assert len(heads["data"]) == TINY.n_layer * TINY.n_head

    depth = json.loads((files / rows[-1]["spectral_depth/alpha_table"]["path"]).read_text())
    assert depth["columns"] == ["step", "lineKey", "lineVal"]  # x = depth, one line per role
    q_line = sorted((x, y) for x, role, y in depth["data"] if role == "q")
    layers = last_report.snapshot.layers
    assert q_line == [(layer.depth, layer.alpha) for layer in layers if layer.role == "q"]
    charts = read.config["_wandb"]["visualize"]
    assert {f"spectral_depth/{m}" for m in DEFAULT_SERIES_METRICS} <= set(charts)
    assert charts["spectral_depth/alpha"]["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    final = json.loads((files / read.summary["spectral_summary/layers"]["path"]).read_text())
    assert len(final["data"]) == len(last_report.snapshot)


def test_no_active_run_is_reported_by_the_guard(wandb_root: Path) -> None:
    publisher = WandbPublisher()
    with pytest.raises(RuntimeError, match="no active W&B run"):
        publisher.publish_config({})
    tracker = SpectralTracker(CharGPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, d_model=8)),
                              every_n_steps=1, publishers=[publisher], publish_timeout_s=0.5)
    with pytest.warns(RuntimeWarning, match="no active W&B run"):  # from the outbox's worker thread
        assert tracker.step(0) is not None
        tracker.flush(timeout=5.0)
    with pytest.warns(RuntimeWarning, match="'wandb' lost"):  # retried until close's deadline
        tracker.close()
    assert tracker.stats.publishers[0].lost == 2  # the configuration and the step report


def test_missing_wandb_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'spectral-plugins\[wandb\]'"):
        WandbPublisher()
