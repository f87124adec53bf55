"""TensorBoardPublisher against the real SummaryWriter, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from spectral_plugins import SpectralEngine
from spectral_plugins.core.keys import map_key
from spectral_plugins.lifecycle.maps import lifecycle_map
from spectral_plugins.lifecycle.signals import SpectralLifecycle
from spectral_plugins.runtime.analyses import HEADLINE_RUN, run_figure_key
from spectral_plugins.runtime.publishing import GuardedPublisher, RunSummary, StepReport
from spectral_plugins.tensorboard import TensorBoardPublisher
from tests.publishers import FaultInjectingPublisher
from tests.tracker_readers import (
    flatten_custom_scalars_layout,
    read_tensorboard_custom_scalars_layouts,
    read_tensorboard_histograms,
    read_tensorboard_images,
    read_tensorboard_scalars,
    tensorboard_runs,
)

pytest.importorskip("tensorboard")
transformers = pytest.importorskip("transformers")

STEPS = (0, 25, 50)
METRICS = ("alpha", "stable_rank", "spectral_norm", "effective_rank")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


Run = tuple[list[StepReport], RunSummary]


def spectral_run(keep_eigenvalues: bool = False) -> Run:
    """Reports of a small random GPT-2 at STEPS (weights perturbed in between) and the run summary,
    with real lifecycle signals as extra scalars."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    engine = SpectralEngine(keep_eigenvalues=keep_eigenvalues)
    lifecycle = SpectralLifecycle()
    reports = []
    for step in STEPS:
        snapshot = engine.analyze(model, step=step)
        extra = lifecycle.update(snapshot).scalars()
        maps = {map_key(m): lifecycle_map(lifecycle.history, m) for m in ("stable_rank", "alpha")}
        reports.append(StepReport(step, snapshot, METRICS, extra, images=maps))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.1).add_(0.02 * torch.randn_like(parameter))
    figures = {run_figure_key(k): v for k, v in lifecycle.summary().scalars().items()}
    summary = RunSummary(reports[-1], figures, "Spectral run finished.",
                         {"every_n_steps": 25, "metrics": list(METRICS)}, headline=HEADLINE_RUN)
    return reports, summary


@pytest.fixture(scope="module")
def run() -> Run:
    return spectral_run()


def publish(publisher: Any, reports: list[StepReport], summary: RunSummary | None = None,
            config: Mapping[str, Any] | None = None) -> None:
    if config is not None:
        publisher.publish_config(config)
    for report in reports:
        publisher.publish_step(report)
    if summary is not None:
        publisher.publish_summary(summary)
    publisher.close()


def test_scalars_equal_the_snapshot_at_every_step(tmp_path: Path, run: Run) -> None:
    reports, _ = run
    publish(TensorBoardPublisher(tmp_path), reports)

    assert list(tensorboard_runs(tmp_path)) == [""]  # no sub-runs: add_scalars is not used
    scalars = read_tensorboard_scalars(tmp_path)
    expected_keys = set().union(*(r.scalars() for r in reports))
    assert set(scalars) == expected_keys
    for index, report in enumerate(reports):
        for layer in report.snapshot:
            for metric in METRICS:
                value = layer.metric(metric)
                series = dict(scalars[f"spectral_{metric}/{layer.key}"])
                if np.isfinite(value):
                    assert series[report.step] == float(np.float32(value))
        for key, value in report.extra_scalars.items():
            assert dict(scalars[key])[report.step] == float(np.float32(value)), (index, key)
    # One section per metric: the prefix before the first "/".
    sections = {key.split("/")[0] for key in scalars}
    assert sections == {f"spectral_{m}" for m in METRICS} | {"spectral_lifecycle"}
    assert [step for step, _ in scalars["spectral_alpha/L01_q"]] == list(STEPS)


def test_custom_scalars_layout_is_written_once_with_every_chart(
        tmp_path: Path, run: Run) -> None:
    reports, _ = run
    publish(TensorBoardPublisher(tmp_path), reports)

    layouts = read_tensorboard_custom_scalars_layouts(tmp_path)
    assert list(layouts) == [""] and len(layouts[""]) == 1
    layout = flatten_custom_scalars_layout(layouts[""][0])
    # reading order: the lifecycle first, then one category per metric
    assert list(layout) == ["spectral_lifecycle"] + [f"spectral_{m}" for m in METRICS]
    assert list(layout["spectral_lifecycle"])[:3] == [
        "lifecycle · wave_front_depth", "lifecycle · nsr_mean", "lifecycle · delta_alpha"]
    groups = {"qk": "q|k", "vo": "v|o", "mlp": "mlp_in|mlp_gate|mlp_out"}
    for metric in METRICS:
        charts = layout[f"spectral_{metric}"]  # one chart per metric x role group
        assert list(charts) == [f"{metric} · {g}" for g in groups] + [f"{metric} · embed+pos_embed"]
    assert layout["spectral_alpha"]["alpha · qk"] == [r"spectral_alpha/L\d+_(q|k)$"]

    # Each chart's regex (TensorBoard applies re.match) picks exactly the intended tags.
    tags = set(read_tensorboard_scalars(tmp_path))
    picked = {t for t in tags if re.match(layout["spectral_alpha"]["alpha · qk"][0], t)}
    assert picked == {f"spectral_alpha/L0{d}_{r}" for d in range(3) for r in "qk"}
    picked = {t for t in tags if re.match(layout["spectral_alpha"]["alpha · mlp"][0], t)}
    assert picked == {f"spectral_alpha/L0{d}_{r}" for d in range(3) for r in ("mlp_in", "mlp_out")}
    picked = {t for t in tags if re.match(layout["spectral_alpha"]["alpha · embed+pos_embed"][0], t)}
    assert picked == {"spectral_alpha/embed", "spectral_alpha/pos_embed"}
    delta = layout["spectral_lifecycle"]["lifecycle · delta_alpha"][0]
    assert {t for t in tags if re.match(delta, t)} == {f"spectral_lifecycle/delta_alpha/{g}"
                                                       for g in ("qk", "vo", "mlp", "all")}
    every_chart = [regex for charts in layout.values() for regexes in charts.values() for regex in regexes]
    assert all(any(re.match(r, t) for r in every_chart) for t in tags)  # every scalar is on a chart


def test_heatmap_images_per_step_decode_as_png(tmp_path: Path, run: Run) -> None:
    from PIL import Image

    reports, _ = run
    publish(TensorBoardPublisher(tmp_path, heatmap_metrics=("alpha", "stable_rank")), reports)

    images = read_tensorboard_images(tmp_path)
    assert set(images) == {"spectral_heatmap/alpha", "spectral_heatmap/stable_rank",
                           "spectral_map/alpha", "spectral_map/stable_rank"}
    for series in images.values():
        assert [step for step, _ in series] == list(STEPS)
        for _, png in series:
            assert png.startswith(PNG_MAGIC)
            with Image.open(io.BytesIO(png)) as image:
                assert image.format == "PNG" and image.mode == "RGB" and min(image.size) > 10


def test_summary_text_panel_and_summary_scalars(tmp_path: Path, run: Run) -> None:
    reports, summary = run
    publish(TensorBoardPublisher(tmp_path), reports, summary, config=summary.config)

    accumulator = tensorboard_runs(tmp_path)[""]
    text_events = accumulator.Tensors("spectral_summary/text_summary")
    assert [e.step for e in text_events] == [STEPS[-1]]
    text = text_events[0].tensor_proto.string_val[0].decode()
    assert text.startswith("Spectral run finished.")
    assert "| key | depth | role | shape | alpha |" in text
    alpha = summary.last.snapshot.layer("L02_mlp_in").alpha
    assert f"| L02_mlp_in | 2 | mlp_in | 128x32 | {alpha:.4g} |" in text
    config = accumulator.Tensors("spectral_config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| every_n_steps | 25 |" in config

    assert "spectral_run/prune_rank_L00" in text  # every run-level figure is in the text panel

    # The headline run-level figures are an HParams session in the sub-run spectral_run, never
    # series of the main run.
    scalars = read_tensorboard_scalars(tmp_path)
    headline = summary.headline_scalars()
    main_tags = tensorboard_runs(tmp_path)[""].Tags()["scalars"]
    assert headline and not any(key.startswith("spectral_run/") for key in main_tags)
    assert {key: dict(scalars[f"spectral_run/{key}"]) for key in headline} == {
        key: {STEPS[-1]: float(np.float32(value))} for key, value in headline.items()}
    hparams = tensorboard_runs(tmp_path)["spectral_run"]
    plugin = hparams.PluginTagToContent("hparams")
    names = ("experiment", "session_start_info", "session_end_info")
    assert {f"_hparams_/{name}" for name in names} <= set(plugin)
    from tensorboard.plugins.hparams import plugin_data_pb2

    experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(headline)
    assert {h.name for h in experiment.hparam_infos} == {"every_n_steps", "metrics"}


def test_eigenvalue_histograms(tmp_path: Path) -> None:
    reports, _ = spectral_run(keep_eigenvalues=True)
    publish(TensorBoardPublisher(tmp_path, histograms=True), reports)
    histograms = read_tensorboard_histograms(tmp_path)
    assert "spectral_log10_eigenvalues/L00_q" in histograms
    assert histograms["spectral_log10_eigenvalues/L02_mlp_out"] == list(STEPS)
    assert len(histograms) == len(reports[0].snapshot)


def test_histograms_without_eigenvalues_warn_once(tmp_path: Path,
                                                  run: Run) -> None:
    reports, _ = run
    with pytest.warns(RuntimeWarning, match="keep_eigenvalues") as record:
        publish(TensorBoardPublisher(tmp_path, histograms=True), reports)
    assert len([w for w in record if "keep_eigenvalues" in str(w.message)]) == 1


def test_a_passed_writer_is_used_and_never_closed(tmp_path: Path, run: Run) -> None:
    from torch.utils.tensorboard import SummaryWriter

    reports, _ = run
    writer = SummaryWriter(log_dir=str(tmp_path))
    publisher = TensorBoardPublisher(writer)  # positionally, as Lightning's logger.experiment
    assert publisher.writer is writer and publisher.log_dir == str(tmp_path)
    publish(publisher, reports[:1])
    assert writer.file_writer is not None  # still open
    writer.add_scalar("user/loss", 1.5, 7)
    writer.close()
    scalars = read_tensorboard_scalars(tmp_path)
    assert scalars["user/loss"] == [(7, 1.5)] and "spectral_alpha/L00_q" in scalars


def test_invalid_arguments_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        TensorBoardPublisher(tmp_path, heatmap_metrics=("alfa",))


def test_a_failing_publisher_never_stops_the_others(tmp_path: Path,
                                                    run: Run) -> None:
    reports, summary = run
    faulty = FaultInjectingPublisher()
    publishers = [GuardedPublisher(faulty, close_timeout_s=2.0),
                  GuardedPublisher(TensorBoardPublisher(tmp_path))]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for publisher in publishers:
            publisher.publish_config(summary.config)
        for report in reports:
            for publisher in publishers:
                publisher.publish_step(report)
        for publisher in publishers:
            publisher.publish_summary(summary)
            publisher.close()

    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len([m for m in messages if "injected fault" in m]) == 1  # rate-limited: the first at once
    # retried until close's deadline, then every entry counted lost; the other publisher got all
    failing, healthy = (p.stats for p in publishers)
    assert 1 <= failing.retries <= faulty.calls < 20 and failing.lost == len(reports) + 2
    assert healthy.delivered == len(reports) + 2 and healthy.lost == healthy.retries == 0
    alpha = read_tensorboard_scalars(tmp_path)["spectral_alpha/L00_q"]
    assert [step for step, _ in alpha] == list(STEPS)
    images = read_tensorboard_images(tmp_path)
    assert set(images) == {"spectral_heatmap/alpha", "spectral_heatmap/stable_rank",
                           "spectral_map/alpha", "spectral_map/stable_rank"}


def test_importing_the_package_imports_no_tracker_and_a_missing_one_names_the_extra() -> None:
    code = (
        "import sys\n"
        "import spectral_plugins, spectral_plugins.tensorboard, spectral_plugins.mlflow\n"
        "assert not {'tensorboard', 'mlflow', 'wandb', 'lightning'} & set(sys.modules), sys.modules.keys()\n"
        "sys.modules['tensorboard'] = None\n"
        "try:\n"
        "    spectral_plugins.tensorboard.TensorBoardPublisher('unused')\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert "pip install 'spectral-plugins[tensorboard]'" in result.stdout


def test_a_lightning_loggers_writer(tmp_path: Path, run: Run) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    reports, _ = run
    logger = loggers.TensorBoardLogger(save_dir=str(tmp_path), name="lit", version=0)
    publish(TensorBoardPublisher(writer=logger.experiment), reports)
    logger.log_metrics({"train_loss": 2.0}, step=3)
    logger.finalize("success")
    scalars = read_tensorboard_scalars(Path(logger.log_dir))
    assert scalars["train_loss"] == [(3, 2.0)]
    assert [step for step, _ in scalars["spectral_alpha/L00_q"]] == list(STEPS)


class FailsOnceImage:
    """Fault injection: an image whose first drawing raises (as matplotlib did when two outbox threads
    drew at once), then draws like the wrapped one."""

    def __init__(self, image: Any) -> None:
        self.image, self.calls = image, 0

    def to_rgb(self) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise ValueError("injected drawing failure")
        return self.image.to_rgb()

    def to_png(self) -> bytes:
        return self.image.to_png()


def test_a_retried_report_after_a_failed_drawing_writes_each_scalar_once(tmp_path: Path, run: Run) -> None:
    reports, _ = run
    key, image = next(iter(reports[1].images.items()))
    flaky = StepReport(reports[1].step, reports[1].snapshot, METRICS, reports[1].extra_scalars,
                       images={key: FailsOnceImage(image)})
    publisher = TensorBoardPublisher(tmp_path)
    publisher.publish_step(reports[0])
    with pytest.raises(ValueError, match="injected"):
        publisher.publish_step(flaky)
    publisher.publish_step(flaky)  # the outbox's retry
    publisher.close()

    scalars = read_tensorboard_scalars(tmp_path)
    assert [step for step, _ in scalars["spectral_alpha/L01_q"]] == [STEPS[0], STEPS[1]]
    assert all(len({s for s, _ in series}) == len(series) for series in scalars.values())
    assert [step for step, _ in read_tensorboard_images(tmp_path)[key]] == [STEPS[0], STEPS[1]]
