"""The import paths users write (README, docs, examples) keep working whatever moves behind them."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import spectral_plugins

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_PATHS = {
    "spectral_plugins.lightning": ["SpectralMonitor"],
    "spectral_plugins.hf": ["SpectralCallback"],
    "spectral_plugins.tensorboard": ["TensorBoardPublisher"],
    "spectral_plugins.mlflow": ["MlflowPublisher"],
    "spectral_plugins.wandb": ["WandbPublisher"],
    "spectral_plugins.tracker": ["SpectralTracker"],
    "spectral_plugins.attention": ["attention_bounds", "AttentionBounds"],
    "spectral_plugins.demo": ["run_demo"],
}


@pytest.mark.parametrize("module", sorted(ADAPTER_PATHS))
def test_public_module_paths_export_their_names(module):
    imported = importlib.import_module(module)
    for name in ADAPTER_PATHS[module]:
        assert hasattr(imported, name), f"{module}.{name}"


def test_every_name_in_the_package_all_resolves():
    for name in spectral_plugins.__all__:
        assert getattr(spectral_plugins, name) is not None


def test_every_import_in_the_docs_and_examples_works():
    """Each ``from spectral_plugins... import ...`` line of the README, docs/ and examples/ runs."""
    pattern = re.compile(r"^\s*(from spectral_plugins[\w.]* import [\w, ]+|import spectral_plugins[\w.]*)",
                         re.M)
    sources = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.py")]
    lines = sorted({m.group(1).strip().rstrip(",")
                    for path in sources for m in pattern.finditer(path.read_text())})
    assert len(lines) > 10
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr


def test_importing_the_core_imports_no_tracker():
    code = ("import sys, spectral_plugins; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'wandb', 'mlflow', 'lightning', 'pytorch_lightning', 'tensorboard', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
