"""The docs stay in step with the code they describe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spectral_plugins import METRICS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_metric_reference_lists_every_metric_with_its_formula_and_key():
    text = (DOCS / "metrics.md").read_text()
    for spec in METRICS.values():
        assert f"`{spec.name}`" in text
        assert spec.formula in text
        assert f"`spectral_{spec.name}/<layer_key>`" in text


def test_api_reference_links_every_top_level_name():
    import spectral_plugins

    text = (DOCS / "api" / "index.md").read_text()
    missing = [name for name in spectral_plugins.__all__ if f"[`{name}`][" not in text]
    assert not missing, f"docs/api/index.md does not list {missing}"


def test_docs_site_builds_strict(tmp_path):
    """The guide and the API reference build with no warning: every link between pages and every
    cross-reference in a docstring resolves (scripts/test.sh builds it too)."""
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=DOCS.parent, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    warnings = [line for line in result.stderr.splitlines() if not line.startswith("INFO")]
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings)
    assert (tmp_path / "api" / "index.html").is_file()
