"""The ``analyze`` command's progress bar (tqdm on stderr, advanced by the engine's callbacks)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from spectral_plugins import SpectralEngine, map_model
from spectral_plugins.cli import _progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 24))


def test_progress_bar_follows_the_engine_to_the_last_matrix(monkeypatch: pytest.MonkeyPatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with pytest.warns(UserWarning, match="no recognised role"):  # plain Linears: role "other"
        model_map = map_model(_model())
    engine = SpectralEngine(max_batch_bytes=1)  # one matrix per batch: three progress calls
    engine.analyze(model_map, progress=_progress_bar(len(model_map)))
    frames = terminal.getvalue().split("\r")
    assert "0/3" in frames[1]  # drawn empty before the first batch
    assert "100%" in frames[-1] and "3/3" in frames[-1] and frames[-1].endswith("\n")  # closed when done


def test_progress_bar_is_silent_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch):
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    update = _progress_bar(2)
    update(1, 2)
    update(2, 2)
    assert pipe.getvalue() == ""
