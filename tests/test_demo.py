"""The demo: model roles, bundled data, the ``demo`` subcommand, and a short end-to-end run."""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from spectral_plugins import compare_runs, map_model
from spectral_plugins.demo.cli import add_demo_parser
from spectral_plugins.demo.data import VOCAB, CharWindows, decode, encode, stdlib_dir, stdlib_text
from spectral_plugins.demo.model import CharGPT, GPTConfig
from tests.adapters.test_lightning import restore_mlflow_globals
from tests.adapters.test_wandb import reset_wandb, set_wandb_env
from tests.tracker_readers import read_tensorboard_images, read_tensorboard_scalars, read_wandb_offline_run

TINY = GPTConfig(vocab_size=len(VOCAB), block_size=16, n_layer=2, n_head=2, d_model=32)


def test_the_model_map_recognises_every_role_and_depth() -> None:
    model_map = map_model(CharGPT(GPTConfig()))
    assert model_map.num_blocks == 4
    keys = [ref.key for ref in model_map]
    assert keys[:2] == ["embed", "pos_embed"] and keys[-1] == "lm_head"
    for depth in range(4):
        assert [(r.role, r.shape) for r in model_map.by_depth(depth)] == [
            ("q", (128, 128)), ("k", (128, 128)), ("v", (128, 128)), ("o", (128, 128)),
            ("mlp_in", (512, 128)), ("mlp_out", (128, 512))]
    assert {r.num_heads for r in model_map.by_role("q")} == {4}


def test_the_model_trains_and_generates() -> None:
    model = CharGPT(TINY)
    x = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    logits, loss = model(x, x)
    assert logits.shape == (2, TINY.block_size, TINY.vocab_size) and loss.item() > 0
    out = model.generate(x[:, :4], 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 9)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="does not split"):
        GPTConfig(d_model=30, n_head=4)


def test_the_bundled_text_is_the_standard_library() -> None:
    text = stdlib_text(50_000)
    assert len(text) == 50_000 and "def " in text
    assert text.startswith((sorted(stdlib_dir().glob("*.py"))[0]).read_text(errors="replace")[:100])
    ids = encode("def f(x):\n\treturn x  # é")
    assert decode(ids) == "def f(x):\n\treturn x  #  " and int(ids.max()) < len(VOCAB)
    windows = CharWindows(encode(text), block_size=8, num_samples=5, seed=1)
    x, y = windows[3]
    assert len(windows) == 5 and torch.equal(x[1:], y[:-1])
    with pytest.raises(FileNotFoundError):
        stdlib_text(root=Path("/nonexistent"))


def test_the_demo_subcommand_parses_its_options() -> None:
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--max-steps", "10", "--trackers", "tensorboard,mlflow"])
    assert (args.max_steps, args.every_n_steps, args.out_dir, args.trackers) == (10, 25, "demo_runs",
                                                                                 "tensorboard,mlflow")
    assert callable(args.handler)


def test_unknown_trackers_are_refused(tmp_path: Path) -> None:
    from spectral_plugins.demo import run_demo

    with pytest.raises(ValueError, match="unknown tracker"):
        run_demo(tmp_path, trackers=["neptune"])


@pytest.mark.slow
def test_a_short_demo_writes_all_three_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from spectral_plugins.demo import run_demo

    set_wandb_env(monkeypatch, tmp_path / "wandb_env")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        with restore_mlflow_globals():
            result = run_demo(tmp_path / "out", max_steps=4, every_n_steps=2, batch_size=4, config=TINY,
                              max_chars=20_000, verbose=True)
    finally:
        reset_wandb()
    assert result.steps == 4 and result.snapshot_steps == (0, 2, 4)
    printed = capsys.readouterr().out
    for line in result.instructions[1:]:
        assert line in printed
    assert f"tensorboard --logdir {result.tensorboard_dir}" in printed
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'out' / 'mlflow.db'}" in printed
    assert f"wandb sync {result.wandb_run_dir}" in printed

    [version_dir] = result.tensorboard_dir.glob("chargpt/version_*")
    tensorboard = read_tensorboard_scalars(version_dir)
    assert [s for s, _ in tensorboard["spectral_alpha/L01_q"]] == [0, 2, 4]
    assert "spectral_attention/logit_bound_rank_aware/L00_attn" in tensorboard
    with sqlite3.connect(tmp_path / "out" / "mlflow.db") as db:
        query = "select step from metrics where key = 'spectral_alpha/L01_q' order by step"
        steps = db.execute(query).fetchall()
    assert [s for (s,) in steps] == [0, 2, 4]
    wandb_run = read_wandb_offline_run(result.wandb_run_dir)
    assert [row["spectral/step"] for row in wandb_run.history if "spectral/step" in row] == [0, 2, 4]
    assert "per-layer spectra at step 4" in result.summary_text

    # A readable default: each tracker receives at most 2 x (matrices) + 40 scalar series, and the
    # lifecycle maps reach all three.
    budget = 2 * len(map_model(CharGPT(TINY))) + 40
    with sqlite3.connect(tmp_path / "out" / "mlflow.db") as db:
        mlflow_keys = {key for (key,) in db.execute("select distinct key from metrics")}
    wandb_keys = {key for row in wandb_run.history for key, value in row.items()
                  if isinstance(value, (int, float)) and not key.startswith("_")}
    tensorboard_all = read_tensorboard_scalars(version_dir)  # the HParams sub-run included
    for keys in (mlflow_keys, wandb_keys, set(tensorboard_all)):
        assert "spectral_alpha/L01_q" in keys and len(keys) <= budget, sorted(keys)
    assert {"spectral_map/stable_rank", "spectral_map/alpha"} <= set(read_tensorboard_images(version_dir))
    assert all(f"spectral_map/{m}" in wandb_run.history[-1] or any(f"spectral_map/{m}" in row
               for row in wandb_run.history) for m in ("stable_rank", "alpha"))
    artifacts = tmp_path / "out" / "mlartifacts"
    assert {p.name for p in artifacts.rglob("spectral/maps/*.png")} == {"stable_rank.png", "alpha.png"}

    # The same run read back from each tracker compares equal, params included.
    comparison = compare_runs([str(version_dir), str(result.wandb_run_dir), f"mlflow:{result.mlflow_run_id}"],
                              tracking_uri=result.mlflow_uri)
    histories = [run.history for run in comparison.runs]
    assert all(list(h.steps) == [0, 2, 4] for h in histories)
    for history in histories[1:]:
        np.testing.assert_allclose(history.values("alpha"), histories[0].values("alpha"), rtol=1e-6)
    assert all(run.params.get("lr") == "0.003" for run in comparison.runs)
    files = comparison.save(tmp_path / "compare")
    assert files.html.exists() and len(files.figures) == 4


@pytest.mark.slow
def test_the_demos_wave_front_has_a_value_at_most_steps_of_its_compression_phase(tmp_path: Path) -> None:
    """The fast lane (every 5 steps by default) gives the wave front step resolution: with full
    snapshots alone (every 25 steps) it had 4 points in the demo's compression phase (steps 1-100)."""
    from spectral_plugins.demo import run_demo

    result = run_demo(tmp_path / "out", max_steps=100, trackers=["tensorboard"], attention=False,
                      max_chars=200_000, verbose=False)
    [version_dir] = result.tensorboard_dir.glob("chargpt/version_*")
    tensorboard = read_tensorboard_scalars(version_dir)
    fast_steps = set(range(5, 101, 5))
    assert fast_steps <= {s for s, _ in tensorboard["spectral_lifecycle/nsr_mean/qk"]}
    for group in ("qk", "vo", "mlp"):
        front = {s for s, _ in tensorboard[f"spectral_lifecycle/wave_front_depth/{group}"]}
        assert len(front & fast_steps) > len(fast_steps) / 2, (group, sorted(front))
