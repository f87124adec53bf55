"""The tracker readers return exactly what the real trackers wrote (no mocks)."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.mlflow_server import CLIENT_ENV, MlflowServer, free_port
from tests.tracker_readers import (
    WandbMetricDefinition,
    WandbOfflineRun,
    find_wandb_offline_run,
    flatten_custom_scalars_layout,
    iter_wandb_records,
    read_tensorboard_custom_scalars_layout,
    read_tensorboard_custom_scalars_layouts,
    read_tensorboard_histograms,
    read_tensorboard_images,
    read_tensorboard_scalars,
    read_wandb_offline_run,
    wait_for_wandb_exit,
)


def wandb_env(root: Path) -> dict[str, str]:
    """Offline, quiet, no git/code/system-stats collection, every W&B directory under ``root``."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB__DISABLE_STATS": "true",
        "WANDB__DISABLE_META": "true",
    }
    for name in ("CACHE", "CONFIG", "DATA", "ARTIFACT"):
        env[f"WANDB_{name}_DIR"] = str(root / name.lower())
    return env


LOSSES = [0.9, 0.4, 0.6]
PIXELS = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
TABLE_COLUMNS = ["layer", "alpha"]
TABLE_DATA = [["L00.q", 2.5], ["L01.k", 3.5]]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One real offline run, shared by the W&B tests: ``(root dir, run id)``."""
    import wandb

    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in wandb_env(root).items():
            patch.setenv(name, value)
        run = wandb.init(mode="offline", dir=root, project="readers", config={"lr": 0.01})
        run.define_metric("train/step")
        run.define_metric("train/loss", step_metric="train/step", summary="min")
        for i, loss in enumerate(LOSSES):
            run.log({"train/step": 10 * (i + 1), "train/loss": loss})
        run.log(
            {
                "train/step": 40,
                "media/heatmap": wandb.Image(PIXELS, caption="depth x role"),
                "media/table": wandb.Table(columns=TABLE_COLUMNS, data=TABLE_DATA),
            }
        )
        run.summary["best/alpha"] = 2.5
        run.config.update({"late": [1, 2]})
        run.finish()
        yield root, run.id


@pytest.fixture(scope="module")
def wandb_read(wandb_run: tuple[Path, str]) -> WandbOfflineRun:
    root, run_id = wandb_run
    (run_dir,) = (root / "wandb").glob(f"offline-run-*-{run_id}")
    return read_wandb_offline_run(run_dir)


def _user_keys(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if not key.startswith("_")}


def test_wandb_history_keeps_every_row_and_the_step_key(wandb_read: WandbOfflineRun) -> None:
    rows = [_user_keys(row) for row in wandb_read.history]
    assert rows[:3] == [
        {"train/step": 10, "train/loss": 0.9},
        {"train/step": 20, "train/loss": 0.4},
        {"train/step": 30, "train/loss": 0.6},
    ]
    assert [row["_step"] for row in wandb_read.history] == [0, 1, 2, 3]
    assert wandb_read.series("train/loss", "train/step") == [(10, 0.9), (20, 0.4), (30, 0.6)]
    assert rows[3]["train/step"] == 40


def test_wandb_media_values_and_files(wandb_read: WandbOfflineRun) -> None:
    image = wandb_read.history[3]["media/heatmap"]
    assert image["_type"] == "image-file"
    assert (image["width"], image["height"], image["format"]) == (6, 4, "png")
    assert image["caption"] == "depth x role"
    table = wandb_read.history[3]["media/table"]
    assert (table["_type"], table["nrows"], table["ncols"]) == ("table-file", 2, 2)
    assert wandb_read.files == sorted([image["path"], table["path"]])

    files = wandb_read.run_dir / "files"
    assert np.array_equal(np.asarray(Image.open(files / image["path"])), PIXELS)
    saved = json.loads((files / table["path"]).read_text())
    assert saved == {"columns": TABLE_COLUMNS, "data": TABLE_DATA}


def test_wandb_summary_config_and_metric_definitions(
    wandb_read: WandbOfflineRun, wandb_run: tuple[Path, str]
) -> None:
    assert wandb_read.summary["train/loss"] == {"min": 0.4}  # summary="min" replaces the value
    assert wandb_read.summary["train/step"] == 40
    assert wandb_read.summary["best/alpha"] == 2.5
    image_path = wandb_read.history[3]["media/heatmap"]["path"]
    assert wandb_read.summary["media/heatmap"]["path"] == image_path
    assert _user_keys(wandb_read.config) == {"lr": 0.01, "late": [1, 2]}
    plain = {"glob_name": "", "goal": "", "hidden": False}
    assert wandb_read.metric_definitions == [
        WandbMetricDefinition("train/step", step_metric="", summary=(), step_sync=False, **plain),
        WandbMetricDefinition(
            "train/loss", step_metric="train/step", summary=("min",), step_sync=True, **plain
        ),
    ]
    assert (wandb_read.run_id, wandb_read.project, wandb_read.exit_code) == (
        wandb_run[1],
        "readers",
        0,
    )


def test_wandb_record_framing_rejects_corruption_and_tolerates_a_cut_tail(
    wandb_read: WandbOfflineRun, tmp_path: Path
) -> None:
    (log,) = wandb_read.run_dir.glob("run-*.wandb")
    data = log.read_bytes()
    count = len(list(iter_wandb_records(log)))
    assert count == len(wandb_read.records) > 10

    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[:-3])
    assert len(list(iter_wandb_records(cut))) == count - 1

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        list(iter_wandb_records(bad))

    bad.write_bytes(b"LDB!" + data[4:])
    with pytest.raises(ValueError, match="not a W&B record log"):
        list(iter_wandb_records(bad))

    live = tmp_path / "offline-run-20260101_000000-live"
    live.mkdir()
    (live / "run-live.wandb").write_bytes(data[:7])  # what finish() may leave for a moment
    assert read_wandb_offline_run(live, wait_for_exit_s=None).history == []
    with pytest.raises(TimeoutError, match="no exit record"):
        wait_for_wandb_exit(live, timeout_s=0.1)


def test_wandb_records_spanning_blocks_and_latest_run(
    wandb_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run in the same root: bigger than several 32 KiB blocks, and found as latest."""
    import wandb

    root = wandb_run[0]
    for name, value in wandb_env(root).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(FileNotFoundError):
        find_wandb_offline_run(root / "cache")
    assert find_wandb_offline_run(root).name.endswith(wandb_run[1])  # the only run so far
    run = wandb.init(mode="offline", dir=root, project="readers")
    big = "".join(chr(65 + i % 26) for i in range(70_000))  # FIRST, MIDDLE and LAST chunks
    run.log({"text": big})
    rows = [{f"spectral_alpha/L{layer:02d}.q": step + layer / 100 for layer in range(40)}
            for step in range(60)]  # fmt: skip
    for row in rows:
        run.log(row)
    run.finish()

    run_dir = find_wandb_offline_run(root)
    assert run_dir.name.endswith(run.id)
    (log,) = run_dir.glob("run-*.wandb")
    assert log.stat().st_size > 4 * 32768
    read = read_wandb_offline_run(run_dir)
    assert read.history[0]["text"] == big
    assert [_user_keys(row) for row in read.history[1:]] == rows


def test_tensorboard_scalars_images_histograms_and_layout(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    values = {0: 3.1, 25: 2.7, 50: 2.2}
    chw = np.stack([PIXELS[..., c] for c in range(3)])  # add_image takes CHW
    layout = {
        "spectral": {
            "alpha by depth": ["Multiline", ["spectral_alpha/L00.*", "spectral_alpha/L01.*"]],
            "alpha band": ["Margin", ["alpha/mean", "alpha/low", "alpha/high"]],
        },
        "lifecycle": {"wave": ["Multiline", ["spectral_lifecycle/wave_front_depth"]]},
    }
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        for step, value in values.items():
            writer.add_scalar("spectral_alpha/L00.q", value, step)
        writer.add_image("heatmap/alpha", chw, 25)
        writer.add_histogram("spectrum/L00.q", np.linspace(0.0, 1.0, 64), 50)
        writer.add_custom_scalars(layout)

    scalars = read_tensorboard_scalars(tmp_path)
    assert scalars == {"spectral_alpha/L00.q": [(s, float(np.float32(v))) for s, v in values.items()]}
    images = read_tensorboard_images(tmp_path)
    assert list(images) == ["heatmap/alpha"]
    [(step, png)] = images["heatmap/alpha"]
    assert step == 25 and png.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), PIXELS)
    assert read_tensorboard_histograms(tmp_path) == {"spectrum/L00.q": [50]}

    written = read_tensorboard_custom_scalars_layout(tmp_path)
    assert written is not None
    assert flatten_custom_scalars_layout(written) == {
        "spectral": {
            "alpha by depth": ["spectral_alpha/L00.*", "spectral_alpha/L01.*"],
            "alpha band": ["alpha/mean", "alpha/low", "alpha/high"],
        },
        "lifecycle": {"wave": ["spectral_lifecycle/wave_front_depth"]},
    }
    assert written.category[0].chart[1].WhichOneof("content") == "margin"
    assert [len(v) for v in read_tensorboard_custom_scalars_layouts(tmp_path).values()] == [1]


def test_tensorboard_sub_runs_and_layout_merging(tmp_path: Path) -> None:
    """Sub-run tags get the run path as prefix; layouts: last per run, merged across runs."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        writer.add_scalar("loss", 1.0, 1)
        writer.add_custom_scalars({"old": {"c": ["Multiline", ["loss"]]}})
        writer.add_custom_scalars({"A": {"c1": ["Multiline", ["loss"]]}})
    with SummaryWriter(log_dir=str(tmp_path / "val")) as writer:
        writer.add_scalar("loss", 2.0, 1)
        writer.add_custom_scalars(
            {"A": {"c1": ["Multiline", ["loss"]], "c2": ["Multiline", ["val"]]},
             "B": {"c3": ["Multiline", ["b"]]}}
        )  # fmt: skip

    assert read_tensorboard_scalars(tmp_path) == {"loss": [(1, 1.0)], "val/loss": [(1, 2.0)]}
    layouts = read_tensorboard_custom_scalars_layouts(tmp_path)
    assert {run: len(written) for run, written in layouts.items()} == {"": 2, "val": 1}
    merged = read_tensorboard_custom_scalars_layout(tmp_path)
    assert merged is not None
    assert flatten_custom_scalars_layout(merged) == {
        "A": {"c1": ["loss"], "c2": ["val"]},
        "B": {"c3": ["b"]},
    }

    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        writer.add_scalar("val/loss", 3.0, 2)  # same name as run "val", tag "loss"
    with pytest.raises(ValueError, match="two TensorBoard runs"):
        read_tensorboard_scalars(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_tensorboard_scalars(tmp_path / "missing")


@pytest.mark.slow
def test_mlflow_server_round_trip(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 1  # bounded (fixture or conftest)
    assert int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 10
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment_id = client.create_experiment("readers")
    assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
    run_id = client.create_run(experiment_id).info.run_id
    now = int(time.time() * 1000)
    points = [(0, 3.1), (50, 2.2), (25, 2.7)]  # logged out of step order on purpose
    client.log_batch(
        run_id,
        metrics=[Metric("spectral_alpha/L00.q", v, now + i, s) for i, (s, v) in enumerate(points)],
        params=[Param("every_n_steps", "25")],
    )
    report = tmp_path / "summary.json"
    report.write_text(json.dumps({"alpha": [3.1, 2.7, 2.2]}))
    client.log_artifact(run_id, str(report), artifact_path="spectral")
    client.set_terminated(run_id)

    history = client.get_metric_history(run_id, "spectral_alpha/L00.q")
    assert sorted((m.step, m.value) for m in history) == sorted(points)
    data = client.get_run(run_id).data
    assert data.params == {"every_n_steps": "25"}
    assert data.metrics == {"spectral_alpha/L00.q": 2.2}  # the value at the highest step
    assert [(a.path, a.is_dir) for a in client.list_artifacts(run_id)] == [("spectral", True)]
    [artifact] = client.list_artifacts(run_id, "spectral")
    assert (artifact.path, artifact.file_size) == ("spectral/summary.json", report.stat().st_size)
    local = client.download_artifacts(run_id, "spectral/summary.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == {"alpha": [3.1, 2.7, 2.2]}
    assert list(mlflow_server.artifacts_dir.rglob("summary.json"))  # stored by the server


def test_mlflow_client_env_fails_fast_on_a_dead_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CLIENT_ENV a call to a server that is not there fails in seconds, not minutes."""
    from mlflow.tracking import MlflowClient

    for name, value in CLIENT_ENV.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        client.search_experiments()
    assert time.monotonic() - start < 15
