"""MlflowPublisher against a real MLflow server, a sqlite store and a file store, read back with
MlflowClient. The ``mlflow_server`` fixture comes from ``tests/mlflow_server.py`` via ``conftest.py``."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from spectral_plugins import Snapshot, analyze
from spectral_plugins.core.keys import map_key
from spectral_plugins.lifecycle.maps import lifecycle_map
from spectral_plugins.lifecycle.signals import SpectralLifecycle
from spectral_plugins.runtime.analyses import HEADLINE_RUN, run_figure_key
from spectral_plugins.runtime.publishing import GuardedPublisher, RunSummary, StepReport
from tests.mlflow_server import free_port

mlflow = pytest.importorskip("mlflow")
transformers = pytest.importorskip("transformers")
from mlflow import MlflowClient  # noqa: E402

from spectral_plugins.mlflow import (  # noqa: E402
    RUN_SUMMARY,
    MlflowPublisher,
    heatmap_artifact_path,
    map_artifact_path,
)

STEPS = (0, 25, 50)
METRICS = ("alpha", "stable_rank", "spectral_norm", "effective_rank")


Run = tuple[list[StepReport], RunSummary]


def spectral_run(scale: float = 1.1, metrics: tuple[str, ...] = METRICS,
                 config: dict[str, Any] | None = None) -> Run:
    """Reports of a small random GPT-2 at STEPS (weights scaled by ``scale`` and perturbed in
    between) with real lifecycle signals, and the run summary."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0))
    lifecycle = SpectralLifecycle()
    reports = []
    for step in STEPS:
        snapshot = analyze(model, step=step)
        maps = {map_key(m): lifecycle_map(lifecycle.history, m) for m in ("stable_rank", "alpha")}
        reports.append(StepReport(step, snapshot, metrics, lifecycle.update(snapshot).scalars(), images=maps))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(scale).add_(0.02 * torch.randn_like(parameter))
    config = {"every_n_steps": 25, "metrics": list(metrics), "scale": scale, **(config or {})}
    figures = {run_figure_key(k): v for k, v in lifecycle.summary().scalars().items()}
    return reports, RunSummary(reports[-1], figures, "Spectral run finished.", config, headline=HEADLINE_RUN)


@pytest.fixture(scope="module")
def run() -> Run:
    return spectral_run()


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow_sqlite') / 'mlflow.db'}"


def publish(publisher: Any, reports: list[StepReport], summary: RunSummary) -> None:
    publisher.publish_config(summary.config)
    for report in reports:
        publisher.publish_step(report)
    publisher.publish_summary(summary)
    publisher.close()


def new_experiment(client: MlflowClient, tmp_path: Path, name: str) -> str:
    """An experiment whose artifacts go below ``tmp_path`` (a sqlite store's default experiment
    would put them in ``./mlruns`` of the current directory)."""
    return client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())


def assert_run_holds(client: MlflowClient, run_id: str, reports: list[StepReport],
                     summary: RunSummary) -> None:
    """Metric histories, params and artifacts of a published run equal what was published."""
    latest = client.get_run(run_id).data.metrics
    assert set(latest) >= set(reports[-1].scalars())
    # Full histories of every alpha / stable rank series and the lifecycle signals of one group.
    keys = [k for k in reports[-1].scalars() if k.startswith(("spectral_alpha/", "spectral_stable_rank/"))
            or k.endswith("/qk")]
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for report in reports:
            if key in report.scalars():
                assert history[report.step] == report.scalars()[key], (key, report.step)
    history = client.get_metric_history(run_id, "spectral_alpha/L01_q")
    assert [m.step for m in history] == list(STEPS)
    assert [m.value for m in history] == [r.snapshot.layer("L01_q").alpha for r in reports]

    data = client.get_run(run_id).data
    assert data.params["spectral/every_n_steps"] == "25"
    assert data.params["spectral/metrics"] == ",".join(summary.last.metrics)
    last = summary.last.snapshot
    for layer in last:  # the latest values are the final per-layer figures
        assert data.metrics[f"spectral_alpha/{layer.key}"] == layer.alpha
    headline = summary.headline_scalars()  # the headline run-level figures: one point each
    assert headline and {k: v for k, v in data.metrics.items() if k.startswith("spectral_run/")} == headline
    for key in headline:
        assert [m.step for m in client.get_metric_history(run_id, key)] == [STEPS[-1]]
    figures = json.loads(Path(client.download_artifacts(run_id, RUN_SUMMARY)).read_text())
    assert figures == {"step": STEPS[-1], **summary.finite_scalars()}  # every figure, in a file
    for key, image in summary.last.images.items():  # the final map, replaced in place at every step
        saved = Path(client.download_artifacts(run_id, map_artifact_path(key))).read_bytes()
        assert saved == image.to_png()
    assert {a.path for a in client.list_artifacts(run_id, "spectral/maps")} == {
        "spectral/maps/stable_rank.png", "spectral/maps/alpha.png"}

    heatmaps = [a.path for a in client.list_artifacts(run_id, "spectral/heatmaps/alpha")]
    assert heatmaps == [heatmap_artifact_path("alpha", s) for s in STEPS]
    assert {a.path for a in client.list_artifacts(run_id, "spectral/heatmaps")} == {
        "spectral/heatmaps/alpha", "spectral/heatmaps/stable_rank"}
    assert {a.path for a in client.list_artifacts(run_id, "spectral")} >= {
        "spectral/final_snapshot.json", "spectral/summary.md", "spectral/heatmaps"}
    local = client.download_artifacts(run_id, "spectral/final_snapshot.json")
    assert Snapshot.from_json(Path(local).read_text()) == last
    png = Path(client.download_artifacts(run_id, heatmap_artifact_path("stable_rank", STEPS[1]))).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_a_user_run_on_a_server_receives_everything(mlflow_server: Any, tmp_path: Path,
                                                   run: Run) -> None:
    reports, summary = run
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment_id = client.create_experiment("user-run")
    run_id = client.create_run(experiment_id).info.run_id
    # As the Lightning integration calls it: MlflowPublisher(run_id=logger.run_id, client=logger.experiment)
    publisher = MlflowPublisher(run_id=run_id, client=client)
    publish(publisher, reports, summary)
    assert not publisher.owns_run
    assert client.get_run(run_id).info.status == "RUNNING"  # a user's run is never ended
    assert_run_holds(client, run_id, reports, summary)


@pytest.mark.slow
def test_search_runs_lines_up_two_runs_final_metrics(mlflow_server: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = {}
    for scale in (1.0, 1.2):
        reports, summary = spectral_run(scale=scale)
        publisher = MlflowPublisher(tracking_uri=mlflow_server.uri, experiment_name="compare",
                                    run_name=f"scale-{scale}")
        publish(publisher, reports, summary)
        assert publisher.owns_run
        runs[publisher.run_id] = summary
    experiment = client.get_experiment_by_name("compare")
    found = client.search_runs([experiment.experiment_id], order_by=["params.`spectral/scale` ASC"])
    assert [r.info.run_id for r in found] == list(runs)
    assert all(r.info.status == "FINISHED" for r in found)  # runs it created are ended on close
    for found_run in found:
        final = runs[found_run.info.run_id].last.snapshot
        for layer in final:
            assert found_run.data.metrics[f"spectral_stable_rank/{layer.key}"] == layer.stable_rank
    first, second = (runs[r.info.run_id].last.snapshot.layer("L02_q").alpha for r in found)
    assert first != second
    # The same comparison as a table (what the UI's "compare runs" shows), filtered on a spectral key.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    frame = mlflow.search_runs([experiment.experiment_id], filter_string="metrics.`spectral_alpha/L02_q` > 0")
    assert sorted(frame["metrics.spectral_alpha/L02_q"]) == sorted([first, second])


def test_a_sqlite_store_and_the_active_run(sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           run: Run) -> None:
    reports, summary = run
    client = MlflowClient(tracking_uri=sqlite_uri)
    experiment_id = new_experiment(client, tmp_path, "active-run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    with mlflow.start_run(experiment_id=experiment_id) as active:
        publisher = MlflowPublisher()
        assert publisher.run_id == active.info.run_id
        publish(publisher, reports, summary)
        assert mlflow.active_run() is not None
    assert_run_holds(client, active.info.run_id, reports, summary)


def test_batches_respect_mlflow_limits(sqlite_uri: str, tmp_path: Path) -> None:
    reports, summary = spectral_run(config={"long": "x" * 10_000, "nested": {"depth": 3}})
    wide = StepReport(STEPS[-1] + 25, reports[-1].snapshot,
                      extra_scalars={f"spectral_lifecycle/wide/{i:04d}": float(i) for i in range(2_500)})
    client = MlflowClient(tracking_uri=sqlite_uri)
    experiment_id = new_experiment(client, tmp_path, "limits")
    publisher = MlflowPublisher(client=client, experiment_name="limits")
    publisher.publish_config(summary.config)
    publisher.publish_config({**summary.config, "added": 1})  # params are write-once: only the new key
    publisher.publish_step(wide)
    publisher.close()
    data = client.get_run(publisher.run_id).data
    assert client.get_run(publisher.run_id).info.experiment_id == experiment_id
    assert len(data.metrics) == len(wide.scalars()) > 2_500
    assert len(data.params["spectral/long"]) == 6000
    assert data.params["spectral/nested/depth"] == "3" and data.params["spectral/added"] == "1"


def test_a_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      run: Run) -> None:
    reports, summary = run
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(mlflow.exceptions.MlflowException, match="MLFLOW_ALLOW_FILE_STORE"):
        MlflowPublisher(tracking_uri=uri).publish_config({"a": 1})  # MLflow 3.x refuses file stores
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    publisher = MlflowPublisher(tracking_uri=uri)
    publish(publisher, reports, summary)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(publisher.run_id).info.status == "FINISHED"
    assert_run_holds(client, publisher.run_id, reports, summary)


def test_a_dead_server_never_blocks_training(monkeypatch: pytest.MonkeyPatch,
                                             run: Run) -> None:
    reports, summary = run
    # MLflow's own defaults, which block a call for minutes; the publisher's deadline must bound it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    started = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    publisher = GuardedPublisher(MlflowPublisher(tracking_uri=dead, timeout_s=2.0), close_timeout_s=5.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        publish(publisher, reports, summary)
    elapsed = time.monotonic() - started
    assert elapsed < 30, elapsed  # MLflow's own retries would take minutes per call
    messages = [str(w.message) for w in record]
    assert len([m for m in messages if "'mlflow' failed" in m]) == 1  # rate-limited
    assert any("'mlflow' lost" in m for m in messages)
    stats = publisher.stats
    assert stats.retries >= 2 and stats.delivered == 0 and stats.lost == len(reports) + 2


def test_invalid_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        MlflowPublisher(tracking_uri="sqlite:///unused.db", heatmap_metrics=("alfa",))
    with pytest.raises(ValueError, match="timeout_s"):
        MlflowPublisher(tracking_uri="sqlite:///unused.db", timeout_s=0)


def test_summary_artifact_is_markdown(sqlite_uri: str, tmp_path: Path,
                                      run: Run) -> None:
    reports, summary = run
    client = MlflowClient(tracking_uri=sqlite_uri)
    new_experiment(client, tmp_path, "summary-only")
    publisher = MlflowPublisher(client=client, experiment_name="summary-only")
    publisher.publish_summary(summary)  # no step published: the final figures are logged here
    publisher.close()
    data = client.get_run(publisher.run_id).data
    assert data.metrics["spectral_alpha/L00_k"] == summary.last.snapshot.layer("L00_k").alpha
    text = Path(client.download_artifacts(publisher.run_id, "spectral/summary.md")).read_text()
    assert text.startswith("Spectral run finished.") and "| L00_k | 0 | k |" in text
    snapshot = json.loads(Path(client.download_artifacts(publisher.run_id, "spectral/final_snapshot.json"))
                          .read_text())
    assert snapshot["step"] == STEPS[-1]


def test_a_lightning_loggers_run(sqlite_uri: str, tmp_path: Path, run: Run) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    reports, summary = run
    logger = loggers.MLFlowLogger(experiment_name="lightning", tracking_uri=sqlite_uri,
                                  artifact_location=(tmp_path / "artifacts").as_uri())
    publisher = MlflowPublisher(run_id=logger.run_id, client=logger.experiment)
    publish(publisher, reports, summary)
    logger.log_metrics({"train_loss": 2.0}, step=3)
    logger.finalize("success")
    client = MlflowClient(tracking_uri=sqlite_uri)
    assert client.get_run(logger.run_id).info.status == "FINISHED"  # ended by Lightning, not by us
    assert_run_holds(client, logger.run_id, reports, summary)


@pytest.mark.slow
def test_a_server_killed_and_restarted_mid_run_loses_nothing(tmp_path: Path) -> None:
    """A real server stopped at step 10 and started again (same port and store) while training goes
    on: every due step's metrics reach MLflow, the run ends FINISHED, no step waits 1 s."""
    import threading

    from spectral_plugins.demo.model import CharGPT, GPTConfig
    from spectral_plugins.runtime.tracker import SpectralTracker
    from tests.mlflow_server import _stop, start_mlflow_server

    server, process = start_mlflow_server(tmp_path / "server")
    port = int(server.uri.rsplit(":", 1)[1])
    config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32)
    model = CharGPT(config)
    publisher = MlflowPublisher(tracking_uri=server.uri, experiment_name="outage", timeout_s=2.0)
    tracker = SpectralTracker(model, every_n_steps=2, publishers=[publisher], metrics=["alpha"],
                              heatmap=False, publish_timeout_s=60.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(0)
    restarted: list[Any] = []
    waits = []
    try:
        for step in range(1, 41):
            x = torch.randint(0, config.vocab_size, (4, config.block_size), generator=generator)
            _, loss = model(x, x.roll(-1, dims=1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 10:
                _stop(process)  # the server dies
            if step == 14:  # and comes back while training goes on
                threading.Thread(target=lambda: restarted.append(
                    start_mlflow_server(tmp_path / "server", port=port)[1]), daemon=True).start()
            started = time.perf_counter()
            tracker.step(step)
            waits.append(time.perf_counter() - started)
            time.sleep(0.25)
        summary = tracker.finish()
        assert max(waits) < 1.0, max(waits)
        assert summary is not None and restarted
        stats = tracker.stats.publishers[0]
        assert stats.lost == 0 and stats.retries >= 1, stats
        client = MlflowClient(tracking_uri=server.uri)
        run = client.get_run(publisher.run_id)
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(publisher.run_id, "spectral_alpha/L00_q")
        assert sorted({m.step for m in history}) == list(range(2, 41, 2))
    finally:
        _stop(process)
        for again in restarted:
            _stop(again)
