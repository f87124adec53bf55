"""The package passes its static type check: mypy as configured in pyproject's ``[tool.mypy]`` (strict
on ``spectral_plugins/core``). scripts/test.sh runs it first; it runs here as well so that a change
checked with pytest alone cannot land a type error (with mypy's cache, a few seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_passes_mypy():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True,
                            timeout=540)
    assert result.returncode == 0, f"mypy found type errors:\n{result.stdout}{result.stderr}"
    assert "no issues found" in result.stdout
