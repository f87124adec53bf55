"""The shared option checks (spectral_plugins.core.options): one message per option, public names,
a string where names are expected is one name."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from spectral_plugins.attention.bounds import attention_bounds
from spectral_plugins.core.metrics import METRIC_NAMES
from spectral_plugins.core.options import (
    ATTENTION_OPTIONS,
    MIN_HISTORY_STEPS,
    check_options,
    metric_list,
    name_list,
)
from spectral_plugins.lifecycle.history import SpectralHistory
from spectral_plugins.runtime.tracker import SpectralTracker
from tests.conftest import tiny_gpt2


@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_steps": 0}, r"every_n_steps must be an integer >= 1, got 0"),
    ({"every_n_steps": 2.5}, r"every_n_steps must be an integer >= 1"),
    ({"threads": 0}, r"threads must be None or an integer >= 1, got 0"),
    ({"metrics": "alfa"}, r"metrics: unknown metric name\(s\) \['alfa'\]"),
    ({"metrics": []}, r"metrics must name at least one metric"),
    ({"metrics": 3}, r"metrics must be a name or a list of names, got 3"),
    ({"heatmap": "alfa"}, r"heatmap: unknown metric name\(s\) \['alfa'\]"),
    ({"include": [3]}, r"include must hold names \(strings\), got \[3\]"),
    ({"exclude": {"a": 1}}, r"exclude must be a name or a list of names"),
    ({"roles": {"*.q": "query"}}, r"roles=\{'\*.q': 'query'\}: a glob \(string\) to one of"),
    ({"roles": ["q"]}, r"roles must be a mapping"),
    ({"method": "fast"}, r"method='fast'; choose one of \['auto', 'gram', 'svd'\]"),
    ({"history": "yes"}, r"history must be True, False or the number of snapshots to keep"),
    ({"history": 3}, r"history must be .* \(an integer >= 8\), got 3"),
    ({"attention": {"sample": 1}}, r"attention: unknown attention_bounds option\(s\) \['sample'\]"),
    ({"attention": "yes"}, r"attention must be True, False or a dict"),
    ({"device": "gpu0"}, r"device='gpu0' is not a device"),
    ({"background": "yes"}, r"background must be True or False, got 'yes'"),
    ({"distributed": 1}, r"distributed must be True, False or None, got 1"),
    ({"series": "some"}, r"series='some'; choose one of \['headline', 'all'\]"),
    ({"outbox_size": 0}, r"outbox_size must be an integer >= 1, got 0"),
    ({"publish_timeout_s": -1}, r"publish_timeout_s must be a number of seconds >= 0, got -1"),
    ({"publish_timeout_s": "30"}, r"publish_timeout_s must be a number of seconds >= 0, got '30'"),
    ({"publish_timeout_s": float("nan")}, r"publish_timeout_s must be a number of seconds >= 0, got nan"),
])
def test_each_bad_option_is_refused_by_its_public_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_options(**kwargs)
    with pytest.raises(ValueError, match=message):  # the tracker refuses it before touching the model
        SpectralTracker(torch.nn.Module(), **kwargs)


def test_no_message_names_an_internal_option() -> None:
    with pytest.raises(ValueError) as raised:
        check_options(history=3)
    assert "max_steps" not in str(raised.value)
    with pytest.raises(ValueError, match=r"publish_heatmaps: unknown metric"):
        check_options(heatmap=["bogus"], names={"heatmap": "publish_heatmaps"})


def test_a_string_is_one_name_everywhere() -> None:
    options = check_options(metrics="alpha", heatmap="alpha", include="*attn*", exclude="*c_proj*")
    assert options.metrics == ("alpha",) and options.heatmap == ("alpha",)
    assert options.include == ("*attn*",) and options.exclude == ("*c_proj*",)
    assert name_list("report_to", ("tensorboard", "mlflow")) == ("tensorboard", "mlflow")
    assert metric_list("metrics", None) == METRIC_NAMES


def test_defaults_and_valid_values_pass_unchanged() -> None:
    options = check_options()
    assert options.metrics == ("alpha", "stable_rank") and options.heatmap == ("alpha", "stable_rank")
    assert options.series == "headline" and check_options(metrics="all", series="all").metrics == METRIC_NAMES
    assert options.history is True and options.threads == 1 and options.distributed is None
    assert check_options(metrics=["stable_rank"], heatmap=True).heatmap == ("stable_rank",)
    assert check_options(heatmap=False).heatmap == ()
    assert check_options(history=MIN_HISTORY_STEPS).history == MIN_HISTORY_STEPS
    assert check_options(device=torch.device("cpu"), threads=None, attention={"delta": 1e-3}).attention == {
        "delta": 1e-3}


def test_the_smallest_history_is_the_lifecycle_histories_own() -> None:
    SpectralHistory(max_steps=MIN_HISTORY_STEPS)
    with pytest.raises(ValueError):
        SpectralHistory(max_steps=MIN_HISTORY_STEPS - 1)


def test_attention_options_are_the_keywords_of_attention_bounds() -> None:
    parameters = inspect.signature(attention_bounds).parameters
    assert set(ATTENTION_OPTIONS) == set(parameters) - {"model", "model_map"}


def test_a_tracker_with_string_names_publishes_that_one_metric() -> None:
    tracker = SpectralTracker(tiny_gpt2(), every_n_steps=1, metrics="alpha", heatmap="alpha",
                              include="*attn*", history=False)
    report = tracker.step(1)
    assert report is not None and report.metrics == ("alpha",) and report.heatmap_metrics == ("alpha",)
    assert set(report.scalars()) == {f"spectral_alpha/{layer.key}" for layer in report.snapshot.layers}
    assert all("attn" in m.name for m in tracker.model_map)
    tracker.close()
