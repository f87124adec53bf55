"""The docs stay in step with the code they describe."""

from __future__ import annotations

from pathlib import Path

from spectral_plugins import METRICS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_metric_reference_lists_every_metric_with_its_formula_and_key():
    text = (DOCS / "metrics.md").read_text()
    for spec in METRICS.values():
        assert f"`{spec.name}`" in text
        assert spec.formula in text
        assert f"`spectral_{spec.name}/<layer_key>`" in text
