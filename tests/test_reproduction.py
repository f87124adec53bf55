"""The reproduction script's paper-scale preset: its configuration, and the same code path run tiny on
the CPU (the real preset belongs on a GPU: benchmarks/reproduce_lifecycle.py --preset paper)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.reproduce_lifecycle import PRESETS, main, parse_args
from spectral_plugins.demo.data import VOCAB
from spectral_plugins.demo.model import CharGPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_paper_preset_is_paper_scale_and_flags_override_it() -> None:
    args = parse_args(["--preset", "paper"])
    assert args.depths == [6, 8, 12] and args.seeds == [0, 1, 2]
    assert args.steps >= 2000 and args.every == 25 and args.dense_until == 0
    assert args.device in ("cuda", "cpu")  # auto: cuda when available
    with torch.device("meta"):  # sizes without allocating
        sizes = [sum(p.numel() for p in CharGPT(GPTConfig(
            vocab_size=len(VOCAB), block_size=args.block_size, n_layer=depth, n_head=args.heads,
            d_model=args.d_model)).parameters()) for depth in args.depths]
    assert 15e6 < sizes[0] < sizes[1] < 30e6 < sizes[2] < 45e6  # about 30M parameters
    small = parse_args(["--preset", "paper", "--d-model", "16", "--depths", "2", "--device", "cpu"])
    assert small.d_model == 16 and small.depths == [2] and small.every == 25 and small.device == "cpu"
    assert parse_args([]).d_model == 64 and "paper" in PRESETS  # no preset: the CPU defaults


@pytest.mark.slow
def test_the_paper_preset_code_path_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    doc = tmp_path / "reproduction.md"
    code = main(["--preset", "paper", "--depths", "2", "4", "--seeds", "0", "1", "--steps", "16",
                 "--every", "4", "--d-model", "16", "--heads", "2", "--block-size", "8", "--batch", "4",
                 "--warmup", "2",
                 "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "out"), "--doc", str(doc)])
    assert code == 0
    text = doc.read_text()
    assert "seeds 0, 1" in text and "device cpu" in text
    for depth in (2, 4):  # one row per depth and seed in the runs table
        for seed in (0, 1):
            assert sum(line.startswith(f"| {depth} | {seed} | ") for line in text.splitlines()) == 1
    assert "nan" not in text.lower()
    assert {p.name for p in (tmp_path / "out").glob("history_*.json")} == {
        "history_L2_s0.json", "history_L2_s1.json", "history_L4_s0.json", "history_L4_s1.json"}
    pruning = json.loads((tmp_path / "out" / "pruning.json").read_text())
    methods = ("alpha", "alpha_reversed", "alpha_drop")
    assert set(pruning) == {f"L4 s{seed}/{m}" for seed in (0, 1) for m in methods}
