"""Run comparison (Delta-alpha vs depth), run readers and the compare / report commands."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from spectral_plugins import compare_runs
from spectral_plugins.lifecycle.history import SpectralHistory
from spectral_plugins.lifecycle.signals import LifecycleConfig
from spectral_plugins.runs.compare import (
    add_compare_parser,
    compare_histories,
    fit_depth_scaling,
    format_table,
    plot_comparison,
)
from spectral_plugins.runs.readers import load_run
from spectral_plugins.runs.report import add_report_parser, render_report
from tests.synthetic import profile_history, wave_history

EXPONENT = 0.26
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _depth_run(num_blocks: int, prefactor: float = 0.3) -> SpectralHistory:
    """Alpha rising linearly over depth with spread ``prefactor * L^0.26``."""
    spread = prefactor * num_blocks**EXPONENT
    return profile_history(3.0 + spread * np.linspace(0.0, 1.0, num_blocks), steps=6)


def test_power_law_exponent_recovered() -> None:
    depths = np.array([2, 4, 8, 16, 32, 64])
    exact = fit_depth_scaling(depths, 0.3 * depths**EXPONENT)
    assert exact.exponent == pytest.approx(EXPONENT, abs=1e-12)
    assert exact.prefactor == pytest.approx(0.3) and exact.r2 == pytest.approx(1.0) and exact.n_runs == 6
    rng = np.random.default_rng(0)
    noisy = fit_depth_scaling(depths, 0.3 * depths**EXPONENT * np.exp(rng.normal(0, 0.03, depths.size)))
    assert noisy.exponent == pytest.approx(EXPONENT, abs=0.05)  # tolerance 0.05 at 3 % noise
    assert noisy.r2 > 0.9 and abs(noisy.exponent - EXPONENT) < 3 * noisy.exponent_stderr
    assert math.isnan(fit_depth_scaling([4, 4], [1.0, 2.0]).exponent)
    assert fit_depth_scaling([4, 8, 16], [1.0, -1.0, math.nan]).n_runs == 1


def test_compare_histories_across_depths(tmp_path: Path) -> None:
    runs = [(f"L{n}", _depth_run(n)) for n in (4, 8, 16, 32)]
    comparison = compare_histories(runs, group="all")
    assert comparison.depths().tolist() == [4, 8, 16, 32]
    assert comparison.fit.exponent == pytest.approx(EXPONENT, abs=1e-9)
    assert comparison.fit.r2 == pytest.approx(1.0)
    table = format_table(comparison)
    assert "L16" in table and "L^0.260" in table
    png = plot_comparison(comparison, tmp_path / "plot.png")
    assert png.read_bytes().startswith(PNG_MAGIC)


def _write_tensorboard(log_dir: Path, history: SpectralHistory) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for metric in ("stable_rank", "alpha"):
        values = history.values(metric)
        for j, info in enumerate(history.matrices):
            for t, step in enumerate(history.steps):
                writer.add_scalar(f"spectral_{metric}/{info.key}", values[t, j], int(step))
    writer.add_scalar("spectral_lifecycle/qk_vo_asymmetry", 0.5, 0)
    writer.close()


def test_tensorboard_and_json_runs_read_back(tmp_path: Path) -> None:
    history = wave_history(num_blocks=3, last=500, interval=50)
    _write_tensorboard(tmp_path / "tb" / "version_0", history)
    run = load_run(str(tmp_path / "tb"))
    assert run.history.steps.tolist() == history.steps.tolist()
    assert {m.key for m in run.history.matrices} == {m.key for m in history.matrices}
    for metric in ("stable_rank", "alpha"):
        for info in history.matrices:
            np.testing.assert_allclose(run.history.series(info.key, metric)[1],
                                       history.series(info.key, metric)[1], rtol=1e-6)  # float32 in events
    history.to_json(tmp_path / "h.json")
    assert load_run(str(tmp_path / "h.json")).history.to_state() == history.to_state()
    with pytest.raises(FileNotFoundError):
        load_run(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no spectral"):
        load_run(str(tmp_path / "empty"))


def _cli(tmp_path: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectral-plugins")
    sub = parser.add_subparsers(dest="command")
    add_compare_parser(sub)
    add_report_parser(sub)
    return parser


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    specs = []
    for n in (4, 8):
        _write_tensorboard(tmp_path / f"L{n}", _depth_run(n))
        specs.append(str(tmp_path / f"L{n}"))
    _depth_run(16).to_json(tmp_path / "L16.json")
    specs.append(str(tmp_path / "L16.json"))
    args = _cli(tmp_path).parse_args(["compare", *specs, "--out", str(tmp_path / "cmp")])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "L4" in out and "L16" in out and "R^2 = 1.000" in out
    assert "L^0.260" in out  # float32 storage in TensorBoard changes nothing at 3 decimals
    page = (tmp_path / "cmp" / "compare.html").read_text()
    for png in ("maps_stable_rank.png", "maps_alpha.png", "series.png", "profiles.png", "depth_scaling.png"):
        assert (tmp_path / "cmp" / png).read_bytes().startswith(PNG_MAGIC) and f'src="{png}"' in page
    assert "nan" not in page.lower().replace("nanmean", "")


def test_report_renders_html_and_png(tmp_path: Path) -> None:
    history = wave_history(num_blocks=6, last=4000, interval=50, speed=2.0, t0=500, t_r=3000,
                           alpha_profile=lambda d: 3.0 - 0.05 * (d - 2.0) ** 2)
    files = render_report(history, tmp_path / "report", title="synthetic <run>",
                          config=LifecycleConfig(fit_timescales=False))
    page = files.html.read_text()
    assert "synthetic &lt;run&gt;" in page and "data:image/png;base64," in page
    assert "Pruning advice" in page and "inverted-U" in page
    assert files.png.read_bytes().startswith(PNG_MAGIC)


def test_report_command_from_a_history_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wave_history(num_blocks=4, last=2000, interval=50).to_json(tmp_path / "run.json")
    args = _cli(tmp_path).parse_args(["report", str(tmp_path / "run.json"), "--out", str(tmp_path / "out"),
                                      "--no-timescales"])
    assert args.handler(args) == 0
    assert (tmp_path / "out" / "spectral_report.html").exists()
    assert "report:" in capsys.readouterr().out
    missing = _cli(tmp_path).parse_args(["report", str(tmp_path / "nothing_here")])
    assert missing.handler(missing) == 2
    assert "no run at" in capsys.readouterr().out


@pytest.mark.slow
def test_mlflow_runs_and_experiment(mlflow_server, tmp_path: Path,  # mlflow_server: tests/conftest.py
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.create_experiment("depth-sweep")
    for n in (4, 8, 16):
        history = _depth_run(n)
        run = client.create_run(experiment, run_name=f"L{n}")
        metrics = [Metric(f"spectral_{metric}/{info.key}", float(history.values(metric)[t, j]), 0, int(step))
                   for metric in ("stable_rank", "alpha") for j, info in enumerate(history.matrices)
                   for t, step in enumerate(history.steps)]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
        client.set_terminated(run.info.run_id)
    loaded = load_run(f"mlflow:{run.info.run_id}", tracking_uri=mlflow_server.uri)
    assert loaded.name == "L16" and loaded.history.num_blocks == 16
    args = _cli(tmp_path).parse_args(["compare", "--mlflow-experiment", "depth-sweep", "--tracking-uri",
                                      mlflow_server.uri, "--out", str(tmp_path / "mlflow")])
    assert args.handler(args) == 0
    assert "L^0.260" in capsys.readouterr().out
    comparison = compare_runs(["mlflow-experiment:depth-sweep"], tracking_uri=mlflow_server.uri)
    assert sorted(r.name for r in comparison.runs) == ["L16", "L4", "L8"]

    missing = _cli(tmp_path).parse_args(["compare", "mlflow:0123456789abcdef", "--tracking-uri",
                                         mlflow_server.uri, "--out", str(tmp_path / "never")])
    assert missing.handler(missing) == 2
    [line] = capsys.readouterr().out.strip().splitlines()
    assert mlflow_server.uri in line and "MLFLOW_TRACKING_URI" in line
    assert not (tmp_path / "never").exists()


def test_two_runs_of_one_depth_get_no_fit_but_one_line_why(tmp_path: Path) -> None:
    a, b = tmp_path / "lr_1e-3.json", tmp_path / "lr_3e-3.json"
    wave_history(num_blocks=4, last=1000, interval=50).to_json(a)
    wave_history(num_blocks=4, last=1000, interval=50, speed=2.0).to_json(b)
    comparison = compare_runs([str(a), str(b)])
    assert comparison.fit_note() == ("No Delta-alpha vs depth fit: it needs runs of at least 3 distinct "
                                     "depths; these runs have 1 (L = 4).")
    assert comparison.fit_note() in format_table(comparison) and "R^2" not in format_table(comparison)
    rows = comparison.table()
    assert [r["run"] for r in rows] == ["lr_1e-3", "lr_3e-3"] and all(r["blocks"] == 4 for r in rows)
    assert all("nan" not in str(value) for row in rows for value in row.values())
    files = comparison.save(tmp_path / "out")
    assert [p.name for p in files.figures] == ["maps_stable_rank.png", "maps_alpha.png", "series.png",
                                               "profiles.png"]  # no depth-scaling plot
    assert "No Delta-alpha vs depth fit" in files.html.read_text()


def test_a_missing_store_or_run_ends_in_one_line_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking._tracking_service import utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(utils, "_tracking_uri", None)  # MLflow's own default (an earlier test may set one)
    args = _cli(tmp_path).parse_args(["compare", "mlflow:abc", "mlflow-experiment:sweep"])
    assert args.handler(args) == 2
    [line] = capsys.readouterr().out.strip().splitlines()
    assert "no MLflow store at sqlite:///" in line and "--tracking-uri" in line
    assert "MLFLOW_TRACKING_URI" in line
    missing_file = f"sqlite:///{tmp_path / 'nothing.db'}"
    args = _cli(tmp_path).parse_args(["compare", "mlflow:abc", "--tracking-uri", missing_file])
    assert args.handler(args) == 2
    assert missing_file in capsys.readouterr().out
    args = _cli(tmp_path).parse_args(["compare", str(tmp_path / "no_such_dir")])
    assert args.handler(args) == 2 and "no run at" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no output folder
