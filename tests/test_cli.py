"""`spectral-plugins analyze` on saved weights: .pt, .safetensors, a Lightning-style checkpoint and a
Hugging Face model directory, each equal to analysing the live model."""

from __future__ import annotations

import json

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


def test_analyze_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["analyze", str(tmp_path / "nope.pt")])
