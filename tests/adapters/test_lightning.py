"""SpectralMonitor in real Lightning Trainers with real loggers, read back with each tracker's reader."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch.utils.data import DataLoader

from spectral_plugins import SpectralEngine
from spectral_plugins.core.keys import STEP_KEY
from spectral_plugins.demo.data import VOCAB, CharWindows, encode, stdlib_text
from spectral_plugins.demo.lightning import CharGPTModule
from spectral_plugins.demo.model import GPTConfig
from spectral_plugins.lightning import LoggerPublisher, SpectralMonitor, logger_kind, publisher_for
from spectral_plugins.runtime.analyses import HEADLINE_LIFECYCLE
from spectral_plugins.runtime.outbox import Outbox
from tests.adapters.test_wandb import reset_wandb, set_wandb_env
from tests.multiprocess import run_ranks
from tests.publishers import FaultInjectingPublisher, RecordingPublisher
from tests.tracker_readers import (
    find_wandb_offline_run,
    flatten_custom_scalars_layout,
    read_tensorboard_custom_scalars_layout,
    read_tensorboard_images,
    read_tensorboard_scalars,
    read_wandb_offline_run,
)

if TYPE_CHECKING:
    from tests.mlflow_server import MlflowServer

CONFIG = GPTConfig(vocab_size=len(VOCAB), block_size=16, n_layer=2, n_head=2, d_model=32)
BATCH = 4
Series = dict[str, list[tuple[int, float]]]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return encode(stdlib_text(20_000))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def restore_mlflow_globals() -> Iterator[None]:
    """``MLFlowLogger`` calls ``mlflow.set_tracking_uri``, which sets a process-wide URI and exports
    ``MLFLOW_TRACKING_URI``; both would redirect later tests' fluent ``mlflow`` calls. Restore them."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def _quiet_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    set_wandb_env(monkeypatch, tmp_path / "wandb_env")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    with restore_mlflow_globals():
        yield
    reset_wandb()


def loader(ids: torch.Tensor, batches: int) -> DataLoader:
    return DataLoader(CharWindows(ids, CONFIG.block_size, batches * BATCH, seed=0), batch_size=BATCH)


def trainer(root: Path, **kwargs: Any) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, log_every_n_steps=1, default_root_dir=str(root))
    return L.Trainer(**{**options, **kwargs})


def sqlite_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One local SQLite MLflow store for the module (creating its tables takes seconds)."""
    from mlflow import MlflowClient

    uri = sqlite_uri(tmp_path_factory.mktemp("mlflow_sqlite"))
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def expected_series(reports: list[Any]) -> Series:
    """What every tracker must hold: each report's scalars at its step."""
    series: Series = {}
    for report in reports:
        for key, value in report.scalars().items():
            series.setdefault(key, []).append((report.step, value))
    return series


def csv_series(path: Path) -> Series:
    series: Series = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith("spectral_") and value != "":
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def mlflow_series(client: Any, run_id: str, keys: list[str]) -> Series:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def float32(series: Series) -> Series:
    """TensorBoard stores scalars as float32."""
    return {k: [(s, float(np.float32(v))) for s, v in points] for k, points in series.items()}


# ------------------------------------------------------------------------------------------ fast checks
@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
    ({"every_n_steps": 2.0}, "every_n_steps must be an integer >= 1"),
    ({"metrics": ["alpha", "bogus"]}, r"unknown metric name\(s\) \['bogus'\]"),
    ({"metrics": []}, "at least one metric"),
    ({"publish_heatmaps": ["bogus"]}, r"unknown metric name\(s\) \['bogus'\]"),
    ({"method": "fast"}, "method='fast'"),
    ({"threads": 0}, "threads must be None or an integer >= 1"),
    ({"history": "yes"}, "history must be True, False or the number of snapshots to keep"),
    ({"history": 3}, r"history must be .*\(an integer >= 8\), got 3"),
    ({"metrics": "alfa"}, r"metrics: unknown metric name\(s\) \['alfa'\]"),
    ({"publish_heatmaps": "alfa"}, r"publish_heatmaps: unknown metric name\(s\) \['alfa'\]"),
    ({"roles": {"*.q": "query"}}, r"roles=\{'\*.q': 'query'\}"),
    ({"attention": {"sample": 1}}, r"attention: unknown attention_bounds option\(s\) \['sample'\]"),
    ({"background": "yes"}, "background must be True or False"),
    ({"distributed": "no"}, "distributed must be True, False or None"),
    ({"outbox_size": 0}, "outbox_size must be an integer >= 1"),
    ({"publish_timeout_s": -1.0}, "publish_timeout_s must be a number of seconds >= 0"),
])
def test_invalid_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpectralMonitor(**kwargs)


class CountingModule(CharGPTModule):
    """Counts the training steps it runs."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("kwargs, message", [
    ({"include": "decoder.*"}, r"include=\['decoder.\*'\] matched none of the \d+ weight matrices"),
    ({"include": ["*attn*"], "exclude": "*"}, r"exclude=\['\*'\] dropped all \d+ weight matrices"),
    ({"roles": {"nothing.*": "q"}}, r"roles pattern 'nothing.\*' matches no module"),
])
def test_patterns_that_select_nothing_stop_the_fit_before_its_first_step(
        tmp_path: Path, ids: torch.Tensor, kwargs: dict[str, Any], message: str) -> None:
    module, recorder = CountingModule(), RecordingPublisher()
    monitor = SpectralMonitor(every_n_steps=1, extra_publishers=[recorder], **kwargs)
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, max_steps=2, logger=False, callbacks=[monitor]).fit(module, loader(ids, 2))
    assert module.steps_run == 0 and recorder.reports == []


def test_a_string_is_one_name(tmp_path: Path, ids: torch.Tensor) -> None:
    recorder = RecordingPublisher()
    monitor = SpectralMonitor(every_n_steps=1, metrics="alpha", publish_heatmaps="alpha", include="*attn*",
                              history=False, extra_publishers=[recorder], outbox_size=7,
                              publish_timeout_s=3.5)
    fit = trainer(tmp_path, max_steps=2, logger=False, callbacks=[monitor])
    fit.fit(CharGPTModule(CONFIG), loader(ids, 2))
    assert [r.step for r in recorder.reports] == [0, 1, 2]
    assert monitor.tracker is not None and monitor.tracker.publish_timeout_s == 3.5  # passed through
    assert [outbox.capacity for outbox in monitor.tracker.publishers] == [7]
    report = recorder.reports[-1]
    assert report.metrics == ("alpha",) and report.heatmap_metrics == ("alpha",)
    assert report.snapshot.layers and all("attn" in layer.name for layer in report.snapshot.layers)


def test_the_monitor_is_a_callback_of_both_lightning_packages() -> None:
    import pytorch_lightning

    monitor = SpectralMonitor()
    assert isinstance(monitor, L.Callback) and isinstance(monitor, pytorch_lightning.Callback)
    assert monitor.state_dict() == {}
    monitor.load_state_dict({"format": "x"})  # kept until training starts
    assert monitor.state_dict() == {"format": "x"}


def test_loggers_are_recognised_from_both_packages(tmp_path: Path) -> None:
    import pytorch_lightning.loggers as pl_loggers

    assert logger_kind(TensorBoardLogger(str(tmp_path))) == "TensorBoardLogger"
    assert logger_kind(pl_loggers.TensorBoardLogger(str(tmp_path))) == "TensorBoardLogger"
    assert logger_kind(MLFlowLogger(tracking_uri=sqlite_uri(tmp_path))) == "MLFlowLogger"
    assert logger_kind(pl_loggers.WandbLogger(offline=True, save_dir=str(tmp_path))) == "WandbLogger"

    class MyTensorBoardLogger(pl_loggers.TensorBoardLogger):
        pass

    assert logger_kind(MyTensorBoardLogger(str(tmp_path))) == "TensorBoardLogger"
    assert logger_kind(CSVLogger(str(tmp_path))) is None
    assert isinstance(publisher_for(CSVLogger(str(tmp_path))), LoggerPublisher)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_every_logger_at_once_matches_the_snapshots(tmp_path: Path, ids: torch.Tensor,
                                                    mlflow_server: MlflowServer) -> None:
    from mlflow import MlflowClient

    recorder = RecordingPublisher()
    loggers = [TensorBoardLogger(str(tmp_path), name="tb"),
               MLFlowLogger(experiment_name="e2e", tracking_uri=mlflow_server.uri),
               WandbLogger(project="e2e", save_dir=str(tmp_path), offline=True),
               CSVLogger(str(tmp_path), name="csv")]
    monitor = SpectralMonitor(fast_every_n_steps=None, every_n_steps=4, extra_publishers=[recorder])
    fit = trainer(tmp_path, max_steps=8, logger=loggers, callbacks=[monitor])
    fit.fit(CharGPTModule(CONFIG), loader(ids, 8))
    loggers[2].experiment.finish()

    assert [r.step for r in recorder.reports] == [0, 4, 8]
    assert recorder.summaries and monitor.summary is recorder.summaries[0]
    expected = expected_series(recorder.reports)
    last = recorder.reports[-1]
    # the default, readable list: alpha and stable rank per matrix and the headline lifecycle series
    num_matrices = len(monitor.tracker.model_map)
    sections = {k.split("/")[0] for k in expected}
    assert sections == {"spectral_alpha", "spectral_stable_rank", "spectral_lifecycle"}
    assert 2 * num_matrices < len(expected) <= 2 * num_matrices + len(HEADLINE_LIFECYCLE)

    # TensorBoard: every scalar (float32), the heatmap images, the custom-scalars layout
    scalars = read_tensorboard_scalars(Path(loggers[0].log_dir))
    assert {k: scalars[k] for k in expected} == float32(expected)
    images = read_tensorboard_images(Path(loggers[0].log_dir))
    assert [step for step, _ in images["spectral_heatmap/alpha"]] == [0, 4, 8]
    assert [step for step, _ in images["spectral_map/stable_rank"]] == [0, 4, 8]
    layout = flatten_custom_scalars_layout(read_tensorboard_custom_scalars_layout(Path(loggers[0].log_dir)))
    assert any("alpha" in title for title in layout)

    # MLflow (real server): histories with the right steps, params, artifacts, final values
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = loggers[1].run_id
    sample = [k for k in expected if k.startswith(("spectral_alpha/", "spectral_lifecycle/"))]
    assert mlflow_series(client, run_id, sample) == {k: expected[k] for k in sample}
    data = client.get_run(run_id).data
    assert {k: data.metrics[k] for k in last.scalars()} == last.scalars()
    headline = recorder.summaries[0].headline_scalars()
    assert headline and {k: v for k, v in data.metrics.items() if k.startswith("spectral_run/")} == headline
    maps = {a.path for a in client.list_artifacts(run_id, "spectral/maps")}
    assert maps == {"spectral/maps/stable_rank.png", "spectral/maps/alpha.png"}
    assert data.params["spectral/every_n_steps"] == "4"
    final = client.download_artifacts(run_id, "spectral/final_snapshot.json", str(tmp_path / "download"))
    assert Path(final).read_text() == last.snapshot.to_json(indent=1)
    heatmaps = [a.path for a in client.list_artifacts(run_id, "spectral/heatmaps/alpha")]
    assert heatmaps == [f"spectral/heatmaps/alpha/step_{s:06d}.png" for s in (0, 4, 8)]

    # W&B (offline record log): every value in the row of its step; Lightning's own rows survive
    run = read_wandb_offline_run(find_wandb_offline_run(tmp_path))
    rows = {row[STEP_KEY]: row for row in run.history if STEP_KEY in row}
    assert sorted(rows) == [0, 4, 8]
    for report in recorder.reports:
        assert {k: rows[report.step][k] for k in report.scalars()} == report.scalars()
    assert any("train/loss" in row for row in run.history)
    assert run.summary["spectral_summary/step"] == 8

    # CSV: flat scalars through log_metrics
    assert {k: v for k, v in csv_series(Path(loggers[3].log_dir) / "metrics.csv").items()
            if k in expected} == expected


class WeightRecorder(L.Callback):
    """Keeps a copy of the weights each time ``global_step`` changes, and counts micro-batches."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.batches = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.batches += 1
        if trainer.global_step not in self.weights:
            self.weights[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_gradient_accumulation_snapshots_follow_optimizer_steps(tmp_path: Path, ids: torch.Tensor,
                                                                 sqlite_store: str) -> None:
    """Also MLflow on a local SQLite store (the other test uses a server)."""
    from mlflow import MlflowClient

    recorder, weights = RecordingPublisher(), WeightRecorder()
    mlflow_logger = MLFlowLogger(experiment_name="accumulate", tracking_uri=sqlite_store,
                                 artifact_location=(tmp_path / "artifacts").as_uri())
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    monitor = SpectralMonitor(every_n_steps=2, metrics=["alpha", "stable_rank", "spectral_norm"],
                              extra_publishers=[recorder], fast_every_n_steps=None)
    trainer(tmp_path, max_steps=6, accumulate_grad_batches=3, logger=[mlflow_logger, csv_logger],
            callbacks=[weights, monitor]).fit(CharGPTModule(CONFIG), loader(ids, 18))

    assert weights.batches == 18 and sorted(weights.weights) == list(range(7))
    assert [r.step for r in recorder.reports] == [0, 2, 4, 6]
    for report in recorder.reports:  # the weights after exactly `step` optimizer steps
        module = CharGPTModule(CONFIG)
        module.load_state_dict(weights.weights[report.step])
        independent = SpectralEngine().analyze(module, step=report.step).scalars(report.metrics)
        assert report.scalars() == {k: v for k, v in independent.items() if math.isfinite(v)} | {
            k: v for k, v in report.extra_scalars.items() if math.isfinite(v)}

    expected = expected_series(recorder.reports)
    client = MlflowClient(tracking_uri=sqlite_store)
    assert mlflow_series(client, mlflow_logger.run_id, list(expected)) == expected
    assert {k: v for k, v in csv_series(Path(csv_logger.log_dir) / "metrics.csv").items()
            if k in expected} == expected


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_the_series(tmp_path: Path, ids: torch.Tensor,
                                                        sqlite_store: str) -> None:
    from mlflow import MlflowClient

    def loggers(run_id: str | None = None) -> list[Any]:
        return [TensorBoardLogger(str(tmp_path), name="tb", version=0),
                MLFlowLogger(experiment_name="resume", tracking_uri=sqlite_store, run_id=run_id,
                             artifact_location=(tmp_path / "artifacts").as_uri())]

    torch.manual_seed(0)
    first_loggers, first = loggers(), RecordingPublisher()
    first_trainer = trainer(tmp_path, max_steps=6, logger=first_loggers,
                            callbacks=[SpectralMonitor(every_n_steps=3, extra_publishers=[first],
                                                       fast_every_n_steps=None)])
    first_trainer.fit(CharGPTModule(CONFIG), loader(ids, 12))
    checkpoint = tmp_path / "stopped.ckpt"
    first_trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["callbacks"]["SpectralMonitor"]
    assert saved["last_step"] == 6 and json.dumps(saved)  # plain data in the checkpoint

    run_id = first_loggers[1].run_id
    second_loggers, second = loggers(run_id), RecordingPublisher()
    monitor = SpectralMonitor(fast_every_n_steps=None, every_n_steps=3, extra_publishers=[second])
    trainer(tmp_path, max_steps=12, logger=second_loggers, callbacks=[monitor]).fit(
        CharGPTModule(CONFIG), loader(ids, 12), ckpt_path=str(checkpoint))

    assert [r.step for r in first.reports] == [0, 3, 6] and [r.step for r in second.reports] == [9, 12]
    assert list(monitor.tracker.history.steps) == [0, 3, 6, 9, 12]
    expected = expected_series(first.reports + second.reports)
    per_step = list(expected)
    # Both fits write event files to version_0; TensorBoard reads them in file-name order, which is not
    # write order when two files are opened in the same second ("...<pid>.9" sorts after "...<pid>.10").
    tensorboard = {k: sorted(v) for k, v in read_tensorboard_scalars(tmp_path / "tb" / "version_0").items()}
    assert {k: tensorboard[k] for k in per_step if k.startswith("spectral_alpha/")} == float32(
        {k: expected[k] for k in per_step if k.startswith("spectral_alpha/")})
    assert [s for s, _ in tensorboard["spectral_lifecycle/nsr_mean/qk"]] == [0, 3, 6, 9, 12]
    client = MlflowClient(tracking_uri=sqlite_store)
    sample = [k for k in per_step if k.startswith(("spectral_stable_rank/", "spectral_lifecycle/nsr_mean"))]
    history = mlflow_series(client, run_id, sample)
    assert history == {k: expected[k] for k in sample}
    assert all(steps == sorted(set(steps)) for steps in ([s for s, _ in v] for v in history.values()))


@pytest.mark.slow
def test_a_faulty_publisher_never_stops_the_fit(tmp_path: Path, ids: torch.Tensor) -> None:
    faulty, recorder = FaultInjectingPublisher(), RecordingPublisher()
    loggers = [TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")]
    monitor = SpectralMonitor(every_n_steps=2, metrics=["alpha"],
                              extra_publishers=[Outbox(faulty, close_timeout_s=3.0), recorder])
    with pytest.warns(RuntimeWarning, match="'fault-injector' failed"):
        fit = trainer(tmp_path, max_steps=6, logger=loggers, callbacks=[monitor])
        fit.fit(CharGPTModule(CONFIG), loader(ids, 6))
    assert fit.global_step == 6 and faulty.calls >= 3
    assert [r.step for r in recorder.reports] == [0, 2, 4, 6] and len(recorder.summaries) == 1
    expected = expected_series(recorder.reports)
    tensorboard = read_tensorboard_scalars(Path(loggers[0].log_dir))
    assert {k: tensorboard[k] for k in expected} == float32(expected)
    assert {k: v for k, v in csv_series(Path(loggers[1].log_dir) / "metrics.csv").items()
            if k in expected} == expected


@pytest.mark.slow
def test_a_pytorch_lightning_trainer_accepts_the_monitor(tmp_path: Path, ids: torch.Tensor) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger as PLCSVLogger
    from pytorch_lightning.loggers import TensorBoardLogger as PLTensorBoardLogger

    from spectral_plugins.demo.model import CharGPT

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = CharGPT(CONFIG)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(*batch)[1]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    recorder = RecordingPublisher()
    loggers = [PLTensorBoardLogger(str(tmp_path), name="tb"), PLCSVLogger(str(tmp_path), name="csv")]
    monitor = SpectralMonitor(every_n_steps=2, metrics=["alpha"], extra_publishers=[recorder])
    fit = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=loggers, callbacks=monitor,
                     log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False)
    fit.fit(Module(), loader(ids, 4))
    assert [r.step for r in recorder.reports] == [0, 2, 4]
    log_dir = Path(loggers[0].log_dir)
    assert read_tensorboard_custom_scalars_layout(log_dir) is not None  # the native publisher wrote it
    expected = expected_series(recorder.reports)
    assert {k: read_tensorboard_scalars(log_dir)[k] for k in expected} == float32(expected)
    csv_values = csv_series(Path(loggers[1].log_dir) / "metrics.csv")
    assert {k: v for k, v in csv_values.items() if k in expected} == expected
    assert all(math.isfinite(v) for points in expected.values() for _, v in points)



class WaitForSnapshot(L.Callback):
    """Lets a background snapshot finish before the next batch, so no due step is skipped (skipping
    is covered by test_background), and counts the skips the monitor's snapshotter saw."""

    def __init__(self, monitor: SpectralMonitor) -> None:
        self.monitor = monitor
        self.skipped = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        snapshotter = self.monitor.tracker.snapshotter if self.monitor.tracker is not None else None
        while snapshotter is not None and snapshotter.busy:
            time.sleep(0.001)
        if snapshotter is not None:
            self.skipped = snapshotter.stats.skipped


def test_background_monitor_publishes_every_due_step_to_tensorboard(tmp_path: Path,
                                                                     ids: torch.Tensor) -> None:
    recorder = RecordingPublisher()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = SpectralMonitor(every_n_steps=2, extra_publishers=[recorder], publish_heatmaps=False,
                              background=True, fast_every_n_steps=None)
    waiter = WaitForSnapshot(monitor)
    fit = trainer(tmp_path, max_steps=8, logger=logger, callbacks=[monitor, waiter])
    fit.fit(CharGPTModule(CONFIG), loader(ids, 8))

    assert [r.step for r in recorder.reports] == [0, 2, 4, 6, 8] and waiter.skipped == 0
    assert recorder.summaries and monitor.summary is recorder.summaries[0]
    assert monitor.tracker is not None and monitor.tracker.snapshotter is None  # closed at fit end
    expected = expected_series(recorder.reports)
    assert any(k.startswith("spectral_lifecycle/") for k in expected)
    scalars = read_tensorboard_scalars(Path(logger.log_dir))
    assert {k: scalars[k] for k in expected} == float32(expected)
    assert [step for step, _ in scalars["spectral_alpha/L00_q"]] == [0, 2, 4, 6, 8]


def _ddp_fit_worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank of a 2-process DDP fit launched like torchrun does (``LOCAL_RANK`` set, so Lightning
    creates no processes of its own); writes what it saw to ``root/rank{rank}.pkl``."""
    import pickle

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    torch.set_num_threads(1)
    recorder, weights = RecordingPublisher(), WeightRecorder()
    monitor = SpectralMonitor(every_n_steps=2, metrics=["alpha", "stable_rank", "spectral_norm"],
                              publish_heatmaps=False, extra_publishers=[recorder])
    fit = trainer(Path(root), devices=world, strategy="ddp", max_steps=5,
                  logger=TensorBoardLogger(root, name="tb", version=0), callbacks=[weights, monitor])
    torch.manual_seed(0)
    fit.fit(CharGPTModule(CONFIG), loader(encode(stdlib_text(20_000)), 12))
    references = {}
    for step, state in weights.weights.items():  # single-process snapshots of the same weights
        module = CharGPTModule(CONFIG)
        module.load_state_dict(state)
        references[step] = SpectralEngine().analyze(module, step=step)
    reports = recorder.reports
    result = {"steps": [r.step for r in reports], "snapshots": [r.snapshot for r in reports],
              "references": references, "summary": monitor.summary is not None,
              "config": recorder.configs[0] if recorder.configs else None,
              "last_step": monitor.tracker.last_step if monitor.tracker else None}
    with open(Path(root) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


@pytest.mark.slow
def test_ddp_ranks_share_snapshots_and_rank_zero_publishes(tmp_path: Path) -> None:
    """A real 2-process DDP fit (gloo, CPU): each rank computes its share of every snapshot, rank 0
    publishes the assembled ones, equal bit for bit to single-process snapshots of the same weights."""
    import pickle
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_ranks(_ddp_fit_worker, 2, (2, port, str(tmp_path)), timeout=300)
    main, other = (pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(2))
    assert main["steps"] == [0, 2, 4, 5] and main["summary"] and main["config"]["ranks"] == 2
    for snapshot, step in zip(main["snapshots"], main["steps"]):
        reference = main["references"][step]
        assert [repr(a) for a in snapshot.layers] == [repr(b) for b in reference.layers]
    assert other["steps"] == [] and not other["summary"] and other["last_step"] == 5
    scalars = read_tensorboard_scalars(tmp_path / "tb" / "version_0")
    alpha_keys = [key for key in scalars if key.startswith("spectral_alpha/")]
    assert alpha_keys and all([s for s, _ in scalars[k]] == [0, 2, 4, 5] for k in alpha_keys)
