"""SpectralCallback in real Hugging Face Trainers with real trackers, read back with each tracker's reader."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from spectral_plugins import analyze
from spectral_plugins.core.keys import STEP_KEY
from spectral_plugins.hf import INSTALL_HINT, TENSORBOARD_SUBDIR, SpectralCallback
from spectral_plugins.runtime.outbox import Outbox
from spectral_plugins.runtime.publishing import StepReport
from spectral_plugins.tensorboard import TensorBoardPublisher
from tests.adapters.test_wandb import set_wandb_env
from tests.conftest import tiny_gpt2
from tests.publishers import FaultInjectingPublisher, RecordingPublisher
from tests.tracker_readers import (
    find_wandb_offline_run,
    read_tensorboard_images,
    read_tensorboard_scalars,
    read_wandb_offline_run,
)

Series = dict[str, list[tuple[int, float]]]
METRICS = ("alpha", "stable_rank", "spectral_norm")


class TokenWindows(Dataset):
    """Seeded random token windows for the tiny GPT-2 (vocabulary 64, 16 positions)."""

    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class ReferenceSnapshots(TrainerCallback):
    """Independent snapshots (``spectral_plugins.analyze``) and weight copies at every optimizer step;
    counts micro-batches (``on_substep_end`` runs for each one but the last of an optimizer step)."""

    def __init__(self) -> None:
        self.snapshots: dict[int, Any] = {}
        self.substeps = 0

    def _take(self, state: Any, model: Any) -> None:
        self.snapshots[state.global_step] = analyze(model, step=state.global_step)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._take(state, model)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.substeps += 1

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._take(state, model)


@pytest.fixture(autouse=True)
def _isolated_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Offline W&B below tmp_path; no MLflow run, tracking URI or experiment (nor their environment
    variables) leaks into other tests."""
    set_wandb_env(monkeypatch, tmp_path / "wandb_env")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    # mlflow.set_experiment / set_tracking_uri (called by the Trainer's MLflowCallback) export these.
    mlflow_env = {name: os.environ.get(name) for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI")}
    yield
    if "mlflow" in sys.modules:
        import mlflow
        import mlflow.tracking.fluent as fluent

        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # the Trainer's MLflowCallback sets the global tracking URI
        fluent._active_experiment_id = None  # ... and the active experiment (no public reset)
        for name, value in mlflow_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One local SQLite MLflow store for the module (creating its tables takes seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow_sqlite') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def use_mlflow(monkeypatch: pytest.MonkeyPatch, uri: str, tmp_path: Path, experiment: str) -> None:
    """Point the Trainer's MLflow integration at the store, artifacts below tmp_path."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).create_experiment(experiment, (tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)


def train(tmp_path: Path, callbacks: list[Any], steps: int = 6, resume: str | None = None,
          **kwargs: Any) -> Trainer:
    options = dict(max_steps=steps, per_device_train_batch_size=4, use_cpu=True, save_strategy="no",
                   disable_tqdm=True, logging_steps=1, learning_rate=1e-2, report_to="none", seed=0)
    args = TrainingArguments(str(tmp_path / "out"), **{**options, **kwargs})
    trainer = Trainer(tiny_gpt2(), args, train_dataset=TokenWindows(256), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def expected_series(reports: list[StepReport]) -> Series:
    series: Series = {}
    for report in reports:
        for key, value in report.scalars().items():
            series.setdefault(key, []).append((report.step, value))
    return series


def float32(series: Series) -> Series:
    """TensorBoard stores scalars as float32."""
    return {k: [(s, float(np.float32(v))) for s, v in points] for k, points in series.items()}


def mlflow_series(uri: str, run_id: str, keys: list[str]) -> Series:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def assert_reports_match_references(reports: list[StepReport], reference: ReferenceSnapshots) -> None:
    """Each published snapshot equals an independent snapshot of the weights at its step."""
    for report in reports:
        independent = reference.snapshots[report.step].scalars(report.metrics)
        exactly = pytest.approx(independent, nan_ok=True, rel=0, abs=0)
        assert report.snapshot.scalars(report.metrics) == exactly
        assert {k: v for k, v in report.scalars().items() if k in independent} == {
            k: v for k, v in independent.items() if math.isfinite(v)}


def trainer_tensorboard_dir(tmp_path: Path) -> Path:
    """The directory the Trainer's TensorBoardCallback wrote to (``output_dir/runs/<time_host>``)."""
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    return run_dir


# ------------------------------------------------------------------------------------------ fast checks
@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
    ({"every_n_steps": True}, "every_n_steps must be an integer >= 1"),
    ({"metrics": ["alpha", "bogus"]}, r"unknown metric name\(s\) \['bogus'\]"),
    ({"metrics": []}, "at least one metric"),
    ({"heatmap": ["bogus"]}, r"unknown metric name\(s\) \['bogus'\]"),
    ({"method": "fast"}, "method='fast'"),
    ({"threads": 0}, "threads must be None or an integer >= 1"),
    ({"history": "yes"}, "history must be True, False or the number of snapshots to keep"),
    ({"history": 3}, r"history must be .*\(an integer >= 8\), got 3"),
    ({"metrics": "alfa"}, r"metrics: unknown metric name\(s\) \['alfa'\]"),
    ({"heatmap": "alfa"}, r"heatmap: unknown metric name\(s\) \['alfa'\]"),
    ({"attention": {"sample": 1}}, r"attention: unknown attention_bounds option\(s\) \['sample'\]"),
    ({"device": "gpu0"}, "device='gpu0' is not a device"),
    ({"report_to": 3}, "report_to must be a name or a list of names"),
    ({"outbox_size": 0}, "outbox_size must be an integer >= 1"),
    ({"publish_timeout_s": True}, "publish_timeout_s must be a number of seconds >= 0"),
])
def test_invalid_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpectralCallback(**kwargs)


class StepCounter(TrainerCallback):
    """Counts the optimizer steps the Trainer takes."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1


def test_include_that_matches_nothing_stops_training_before_its_first_step(tmp_path: Path) -> None:
    counter, recorder = StepCounter(), RecordingPublisher()
    callback = SpectralCallback(every_n_steps=1, include="decoder.*", publishers=[recorder])
    with pytest.raises(ValueError, match=r"include=\['decoder.\*'\] matched none of the \d+ weight matrices"):
        train(tmp_path, [callback, counter], steps=2)
    assert counter.steps == 0 and recorder.reports == []


def test_a_string_is_one_name(tmp_path: Path) -> None:
    recorder = RecordingPublisher()
    callback = SpectralCallback(every_n_steps=1, metrics="alpha", heatmap="alpha", include="*attn*",
                                history=False, publishers=[recorder], report_to="none")
    train(tmp_path, [callback], steps=2)
    assert [r.step for r in recorder.reports] == [0, 1, 2]
    report = recorder.reports[-1]
    assert report.metrics == ("alpha",) and report.heatmap_metrics == ("alpha",)
    assert report.snapshot.layers and all("attn" in layer.name for layer in report.snapshot.layers)


def test_the_package_never_imports_transformers_and_a_missing_one_names_the_extra() -> None:
    code = ("import sys; import spectral_plugins, spectral_plugins.runtime.tracker\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n"
            "sys.modules['transformers'] = None\n"
            "try:\n    import spectral_plugins.hf\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert INSTALL_HINT in result.stdout


def test_the_state_is_plain_json_and_rebuilds_the_callback() -> None:
    callback = SpectralCallback(every_n_steps=3, metrics=["alpha"], roles={"c_fc": "mlp_in"},
                                publishers=[RecordingPublisher()], attention={"sample_batch": torch.ones(2)})
    state = json.loads(json.dumps(callback.state()))
    assert state["args"] == {"every_n_steps": 3, "metrics": ["alpha"], "series": "headline", "include": None,
                             "exclude": None, "roles": {"c_fc": "mlp_in"}, "method": "auto", "heatmap": True,
                             "history": True, "device": None, "threads": 1, "background": False,
                             "per_expert": False, "fast_every_n_steps": 5, "outbox_size": 100,
                             "publish_timeout_s": 30.0, "report_to": None}
    assert state["attributes"] == {"tracker_state": None, "unsaved_options": ["publishers", "attention"]}
    rebuilt = SpectralCallback.from_state(state)  # what Trainer does with restore_callback_states_...=True
    assert rebuilt.options["every_n_steps"] == 3 and rebuilt.publishers == ()
    assert rebuilt.tracker_state is None and rebuilt._unrestored == ["publishers", "attention"]


def test_unreachable_or_unsupported_trackers_warn_and_are_skipped(tmp_path: Path) -> None:
    callback = SpectralCallback()
    args = SimpleNamespace(report_to=["mlflow", "wandb", "comet_ml"], output_dir=str(tmp_path))
    with pytest.warns(RuntimeWarning) as caught:
        assert callback._tracker_publishers(args) == []
    messages = " ".join(str(w.message) for w in caught)
    assert "['comet_ml']" in messages and "no MLflow run is active" in messages
    assert "no W&B run is active" in messages


def test_tensorboard_without_a_trainer_writer_uses_a_sub_run_of_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = SimpleNamespace(output_dir="x")
    (publisher,) = SpectralCallback(report_to="tensorboard")._tracker_publishers(args)
    assert isinstance(publisher, TensorBoardPublisher)
    assert Path(publisher.log_dir) == tmp_path / "tb" / TENSORBOARD_SUBDIR
    publisher.close()
    explicit = RecordingPublisher()
    explicit.name = "tensorboard"  # an explicit publisher named like a tracker replaces the automatic one
    callback = SpectralCallback(report_to="tensorboard", publishers=[explicit])
    assert callback._tracker_publishers(args) == []


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tensorboard_and_mlflow_get_every_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   sqlite_uri: str) -> None:
    import mlflow

    use_mlflow(monkeypatch, sqlite_uri, tmp_path, "hf-e2e")
    recorder, reference = RecordingPublisher(), ReferenceSnapshots()
    callback = SpectralCallback(every_n_steps=2, metrics=(*METRICS, "effective_rank"),
                                heatmap=["effective_rank"], publishers=[recorder], fast_every_n_steps=None,
                                outbox_size=50, publish_timeout_s=20.0)
    train(tmp_path, [callback, reference], report_to=["tensorboard", "mlflow"])
    assert callback.tracker is not None and callback.tracker.publish_timeout_s == 20.0  # passed through
    assert {outbox.capacity for outbox in callback.tracker.publishers} == {50}

    assert [r.step for r in recorder.reports] == [0, 2, 4, 6] and len(recorder.summaries) == 1
    assert callback.summary is recorder.summaries[0] and callback.summary.last.step == 6
    assert_reports_match_references(recorder.reports, reference)
    expected = expected_series(recorder.reports)
    assert any(k.startswith("spectral_lifecycle/") for k in expected)

    # TensorBoard: in the Trainer's own run directory, next to its train/loss
    tensorboard = read_tensorboard_scalars(trainer_tensorboard_dir(tmp_path))
    assert "train/loss" in tensorboard
    assert {k: tensorboard[k] for k in expected} == float32(expected)
    images = read_tensorboard_images(trainer_tensorboard_dir(tmp_path))
    assert [step for step, _ in images["spectral_heatmap/effective_rank"]] == [0, 2, 4, 6]
    headline = callback.summary.headline_scalars()  # an HParams session in the sub-run spectral_run
    assert headline and all(tensorboard[f"spectral_run/{key}"] == [(6, pytest.approx(value, rel=1e-6))]
                            for key, value in headline.items())

    # MLflow: the run the Trainer's integration started (it holds the Trainer's own loss too)
    (run,) = mlflow.search_runs(experiment_names=["hf-e2e"], output_format="list")
    assert "loss" in run.data.metrics and run.data.params["spectral/every_n_steps"] == "2"
    assert mlflow_series(sqlite_uri, run.info.run_id, list(expected)) == expected
    # ... and the summary, published after the Trainer's integration ended the run
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED"
    assert all(final.data.metrics[k] == v for k, v in headline.items())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "spectral")}
    assert {"spectral/final_snapshot.json", "spectral/summary.md"} <= artifacts
    heatmaps = [a.path for a in client.list_artifacts(run.info.run_id, "spectral/heatmaps/effective_rank")]
    assert heatmaps == [f"spectral/heatmaps/effective_rank/step_{s:06d}.png" for s in (0, 2, 4, 6)]


@pytest.mark.slow
def test_gradient_accumulation_snapshots_follow_optimizer_steps(tmp_path: Path) -> None:
    """Also report_to="none" with explicit publishers."""
    recorder, reference = RecordingPublisher(), ReferenceSnapshots()
    publishers = [recorder, TensorBoardPublisher(tmp_path / "tb")]
    callback = SpectralCallback(every_n_steps=2, metrics=METRICS, heatmap=False, publishers=publishers)
    trainer = train(tmp_path, [callback, reference], steps=4, gradient_accumulation_steps=3)

    assert trainer.state.global_step == 4 and reference.substeps == 4 * 2  # 12 micro-batches
    assert sorted(reference.snapshots) == list(range(5))
    assert [r.step for r in recorder.reports] == [0, 2, 4]
    assert_reports_match_references(recorder.reports, reference)
    expected = expected_series(recorder.reports)
    tensorboard = read_tensorboard_scalars(tmp_path / "tb")
    assert {k: tensorboard[k] for k in expected} == float32(expected)
    assert not (tmp_path / "out" / "runs").exists()  # report_to="none": no Trainer tracker


@pytest.mark.slow
def test_wandb_offline_gets_every_snapshot(tmp_path: Path) -> None:
    import wandb

    recorder, reference = RecordingPublisher(), ReferenceSnapshots()
    callback = SpectralCallback(every_n_steps=2, metrics=METRICS, heatmap=["alpha"], publishers=[recorder],
                                fast_every_n_steps=None)
    train(tmp_path, [callback, reference], report_to=["wandb"])
    wandb.finish()

    assert [r.step for r in recorder.reports] == [0, 2, 4, 6]
    assert_reports_match_references(recorder.reports, reference)
    run = read_wandb_offline_run(find_wandb_offline_run(tmp_path / "wandb_dir"))
    rows = {row[STEP_KEY]: row for row in run.history if STEP_KEY in row}
    assert sorted(rows) == [0, 2, 4, 6]
    for report in recorder.reports:
        assert {k: rows[report.step][k] for k in report.scalars()} == report.scalars()
        assert rows[report.step]["spectral_heatmap/alpha"]["_type"] == "image-file"
    assert any("train/loss" in row for row in run.history)  # the Trainer's own rows survive
    assert run.summary["spectral_summary/step"] == 6 and run.config["spectral"]["every_n_steps"] == 2


@pytest.mark.slow
def test_a_faulty_publisher_never_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  sqlite_uri: str) -> None:
    import mlflow

    use_mlflow(monkeypatch, sqlite_uri, tmp_path, "hf-fault")
    faulty, recorder = FaultInjectingPublisher(), RecordingPublisher()
    callback = SpectralCallback(every_n_steps=2, metrics=["alpha"], heatmap=False,
                                publishers=[Outbox(faulty, close_timeout_s=3.0), recorder])
    with pytest.warns(RuntimeWarning, match="'fault-injector' failed"):
        trainer = train(tmp_path, [callback], report_to=["tensorboard", "mlflow"])
    assert trainer.state.global_step == 6 and faulty.calls >= 3
    assert [r.step for r in recorder.reports] == [0, 2, 4, 6] and len(recorder.summaries) == 1
    expected = expected_series(recorder.reports)
    tensorboard = read_tensorboard_scalars(trainer_tensorboard_dir(tmp_path))
    assert {k: tensorboard[k] for k in expected} == float32(expected)
    (run,) = mlflow.search_runs(experiment_names=["hf-fault"], output_format="list")
    assert mlflow_series(sqlite_uri, run.info.run_id, list(expected)) == expected


@pytest.mark.slow
@pytest.mark.parametrize("rebuild", [False, True], ids=["kept-callback", "trainer-rebuilds-callback"])
def test_resume_from_a_checkpoint_continues_the_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        rebuild: bool) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    options: dict[str, Any] = dict(report_to=["tensorboard"], save_strategy="steps", save_steps=4,
                                   restore_callback_states_from_checkpoint=rebuild)
    first = RecordingPublisher()
    train(tmp_path, [SpectralCallback(every_n_steps=2, metrics=METRICS, heatmap=False, publishers=[first])],
          steps=4, **options)
    checkpoint = tmp_path / "out" / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["SpectralCallback"]["attributes"]["tracker_state"]["last_step"] == 4

    second = RecordingPublisher()
    callback = SpectralCallback(every_n_steps=2, metrics=METRICS, heatmap=False, publishers=[second])
    if rebuild:
        with pytest.warns(RuntimeWarning, match="not restored: publishers"):
            trainer = train(tmp_path, [callback], steps=8, resume=str(checkpoint), **options)
        (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SpectralCallback)]
    else:
        train(tmp_path, [callback], steps=8, resume=str(checkpoint), **options)
        assert [r.step for r in second.reports] == [6, 8]
    assert [r.step for r in first.reports] == [0, 2, 4]
    assert list(callback.tracker.history.steps) == [0, 2, 4, 6, 8]
    tensorboard = read_tensorboard_scalars(tmp_path / "tb")
    # Each run writes its own event file; TensorBoard reads them in file-name order, and two files
    # opened in the same second by one process are named "...<pid>.9" and "...<pid>.10", which sort
    # the wrong way round. So compare the steps as a set with their counts, not in read order.
    assert sorted(s for s, _ in tensorboard["spectral_alpha/L00_q"]) == [0, 2, 4, 6, 8]
    # the stable-rank signals also come at the fast lane's steps (every 5 by default), once each
    assert sorted(s for s, _ in tensorboard["spectral_lifecycle/nsr_mean/qk"]) == [0, 2, 4, 5, 6, 8]
    assert os.path.isdir(tmp_path / "out" / "checkpoint-8")
