"""`spectral-plugins analyze` on saved weights: .pt, .safetensors, a Lightning-style checkpoint and a
Hugging Face model directory, each equal to analysing the live model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spectral_plugins import analyze
from spectral_plugins.cli import main
from tests.conftest import tiny_gpt2


def live_alphas(model) -> dict[str, float]:
    return {layer.key: layer.alpha for layer in analyze(model).layers}


def read_alphas(path) -> dict[str, float]:
    return {layer["key"]: layer["alpha"] for layer in json.loads(path.read_text())["layers"]}


@pytest.mark.parametrize("layout", ["pt", "safetensors", "lightning_ckpt", "hf_dir"])
def test_analyze_saved_weights_equals_live_model(layout, tmp_path, capsys):
    model = tiny_gpt2()
    if layout == "pt":
        target = tmp_path / "model.pt"
        torch.save(model.state_dict(), target)
    elif layout == "safetensors":
        from safetensors.torch import save_file

        target = tmp_path / "model.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(target))
        (tmp_path / "config.json").write_text(model.config.to_json_string())
    elif layout == "lightning_ckpt":
        target = tmp_path / "last.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "global_step": 7}, target)
    else:
        target = tmp_path / "hf"
        model.save_pretrained(target)
    out = tmp_path / "snapshot.json"
    assert main(["analyze", str(target), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "L02_mlp_out" in printed or "mlp_out" in printed
    saved = read_alphas(out)
    live = live_alphas(model)
    assert saved.keys() == live.keys()
    for key, alpha in saved.items():
        assert alpha == pytest.approx(live[key], rel=1e-9, nan_ok=True), key


def broken_weights(kind: str, tmp_path: Path) -> Path:
    """A real broken input of each kind a user meets: cut downloads, wrong files, empty folders."""
    good = tmp_path / "good.pt"
    torch.save(tiny_gpt2().state_dict(), good)
    random_bytes = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if kind == "missing":
        return tmp_path / "nope.pt"
    if kind == "empty_dir":
        (tmp_path / "empty_dir").mkdir()
        (tmp_path / "empty_dir" / "config.json").write_text("{}")
        return tmp_path / "empty_dir"
    suffix = ".safetensors" if kind.endswith("safetensors") else ".bin" if kind == "random" else ".pt"
    target = tmp_path / f"model{suffix}"
    if kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated":
        target.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind in ("random", "random_safetensors"):
        target.write_bytes(random_bytes)
    elif kind == "truncated_safetensors":
        from safetensors.torch import save_file

        save_file({"w": torch.randn(64, 64)}, str(target))
        target.write_bytes(target.read_bytes()[:-100])
    else:
        torch.save({"epoch": 3, "note": "no weights here"}, target)
    return target


BROKEN = {
    "missing": "does not exist",
    "empty_dir": "holds no weights",
    "empty": r"is empty \(0 bytes",
    "truncated": r"is not a readable torch.save file \(RuntimeError: .*; truncated or corrupted\?\)",
    "random": r"is not a torch.save file of tensors \(torch.load with weights_only=True refused it",
    "random_safetensors": r"is not a readable .safetensors file \(SafetensorError",
    "truncated_safetensors": r"is not a readable .safetensors file \(SafetensorError",
    "no_tensors": "holds no tensors",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_input_exits_2_with_one_line_saying_what_to_pass(kind, tmp_path, capsys):
    target = broken_weights(kind, tmp_path)
    assert main(["analyze", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()  # one line, no traceback
    assert line.startswith(f"spectral-plugins analyze: error: {target}")
    assert re.search(BROKEN[kind], line), line
    if kind != "no_tensors":
        assert "pass a state dict saved with torch.save" in line


@pytest.mark.parametrize("kind", ["truncated", "random_safetensors"])
def test_the_installed_command_reports_a_broken_file_without_a_traceback(kind, tmp_path):
    target = broken_weights(kind, tmp_path)
    done = subprocess.run([sys.executable, "-m", "spectral_plugins.cli", "analyze", str(target)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert re.search(BROKEN[kind], done.stderr)


def test_an_include_that_matches_nothing_exits_2(tmp_path, capsys):
    target = tmp_path / "model.pt"
    torch.save(tiny_gpt2().state_dict(), target)
    assert main(["analyze", str(target), "--include", "decoder.*"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.search(r"include=\['decoder.\*'\] matched none of the \d+ weight matrices", line)


def test_weights_that_are_not_matrices_are_skipped_and_listed_once(tmp_path, capsys):
    rng = torch.Generator().manual_seed(0)
    state = {
        "blocks.0.attn.q_proj.weight": torch.randn(16, 16, generator=rng),
        "blocks.0.mlp.fc1.weight": torch.randn(32, 16, generator=rng),
        "blocks.0.mlp.fc1.bias": torch.randn(32, generator=rng),
        "position_ids": torch.arange(16).unsqueeze(0),                   # int64, 1 x 16
        "causal_mask": torch.ones(16, 16, dtype=torch.bool),             # bool, 16 x 16
        "counts": torch.ones(16, 16, dtype=torch.int32),                 # int32, 16 x 16
        "stem.conv.weight": torch.randn(8, 3, 3, 3, generator=rng),      # convolution
        "patch.conv1d.weight": torch.randn(8, 4, 5, generator=rng),      # convolution
        "cls_token": torch.randn(1, 16, generator=rng),                  # vector 1 x N
        "head.score.weight": torch.randn(16, 1, generator=rng),          # vector N x 1
    }
    target, out = tmp_path / "mixed.pt", tmp_path / "mixed.json"
    torch.save(state, target)
    assert main(["analyze", str(target), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    analysed = [layer["name"] for layer in json.loads(out.read_text())["layers"]]
    assert sorted(analysed) == ["blocks.0.attn.q_proj.weight", "blocks.0.mlp.fc1.weight"]
    skipped = [line for line in printed.splitlines() if line.startswith("skipped")]
    assert skipped == [
        "skipped 3 tensor(s) that are not floating point: position_ids (int64), causal_mask (bool), "
        "counts (int32)",
        "skipped 2 convolution weight(s) (3-D or more; spectra are of 2-D matrices): "
        "stem.conv.weight 8x3x3x3, patch.conv1d.weight 8x4x5",
        "skipped 2 vector-shaped weight(s) (1 x n or n x 1, no spectrum): cls_token 1x16, "
        "head.score.weight 16x1",
        "skipped 1 1-D tensor(s) (biases, norm scales)",
    ]
    for name in ("position_ids", "causal_mask", "counts", "stem.conv.weight", "cls_token",
                 "head.score.weight"):
        assert printed.count(name) == 1, name
