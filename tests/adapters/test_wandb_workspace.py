"""The W&B workspace definition: the Workspace object and its serialised spec (no W&B server here)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from spectral_plugins import map_model
from spectral_plugins.cli import main
from spectral_plugins.demo.model import CharGPT, GPTConfig
from spectral_plugins.wandb import spectral_workspace

pytest.importorskip("wandb_workspaces")

TINY = GPTConfig(vocab_size=20, block_size=8, n_layer=3, n_head=2, d_model=16)


def spec_sections(workspace: object) -> list[dict]:
    spec = json.loads(workspace._to_model().model_dump_json(by_alias=True, exclude_none=True))
    return spec["spec"]["section"]["panelBankConfig"]["sections"]


def test_sections_in_reading_order_with_one_plot_per_metric_and_role_group() -> None:
    model = CharGPT(TINY)
    workspace = spectral_workspace("team", "proj", model, metrics=["alpha", "stable_rank"], attention=True)
    assert (workspace.entity, workspace.project) == ("team", "proj")
    sections = spec_sections(workspace)
    assert [s["name"] for s in sections] == ["Lifecycle map", "spectral_lifecycle", "spectral_alpha",
                                             "spectral_stable_rank", "spectral_heatmap", "spectral_attention"]
    [maps, lifecycle, alpha, *_] = sections
    assert [p["config"]["mediaKeys"] for p in maps["panels"]] == [["spectral_map/stable_rank"],
                                                                   ["spectral_map/alpha"]]
    wave = next(p["config"] for p in lifecycle["panels"]
                if p["config"]["chartTitle"].endswith("wave_front_depth"))
    assert wave["metrics"] == [f"spectral_lifecycle/wave_front_depth/{g}" for g in ("qk", "vo", "mlp")]
    charts = {p["config"]["chartTitle"]: p["config"] for p in alpha["panels"]}
    assert list(charts) == ["alpha · qk", "alpha · vo", "alpha · mlp", "alpha · embed+pos_embed+lm_head"]
    keys = {ref.key for ref in map_model(model)}
    qk = charts["alpha · qk"]["metrics"]  # every layer of the group: y keys the run really logs
    assert qk == [f"spectral_alpha/L{d:02d}_{r}" for d in range(3) for r in ("k", "q")]
    assert all(key.split("/")[1] in keys for chart in charts.values() for key in chart["metrics"])
    assert all(chart["xAxis"] == "spectral/step" for chart in charts.values())


def test_without_a_model_the_charts_select_layers_by_pattern() -> None:
    sections = spec_sections(spectral_workspace("team", "proj"))
    alpha = next(s for s in sections if s["name"] == "spectral_alpha")
    regex = alpha["panels"][0]["config"]["metricRegex"]
    assert alpha["panels"][0]["config"]["useMetricRegex"] is True
    picked = [k for k in ("spectral_alpha/L03_q", "spectral_alpha/L12_k", "spectral_alpha/L03_v",
                          "spectral_stable_rank/L03_q") if re.search(regex, k)]
    assert picked == ["spectral_alpha/L03_q", "spectral_alpha/L12_k"]


def test_the_command_prints_the_spec_and_says_saving_needs_a_login(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["wandb-workspace", "team/proj", "--print", "--metrics", "alpha"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["entity"] == "team" and spec["project"] == "proj"
    assert main(["wandb-workspace", "no-slash"]) == 2
    assert "ENTITY/PROJECT" in capsys.readouterr().out
    # No W&B server is reachable here: saving fails in one line naming what to do.
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "2")
    assert main(["wandb-workspace", "team/proj"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "wandb login" in out[0]


def test_a_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.workspaces", None)
    with pytest.raises(ModuleNotFoundError, match=r"spectral-plugins\[wandb-workspaces\]"):
        spectral_workspace("team", "proj")
