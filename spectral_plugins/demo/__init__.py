"""The demo: a small character-level GPT trained on CPU with SpectralMonitor logging to TensorBoard,
MLflow and offline W&B at once (``spectral-plugins demo`` or ``python examples/demo.py``).

Importing this package is cheap; :func:`run_demo` imports Lightning and the trackers when called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_demo"]


def run_demo(*args: Any, **kwargs: Any) -> Any:
    """See :func:`spectral_plugins.demo.run.run_demo`."""
    from .run import run_demo as _run_demo

    return _run_demo(*args, **kwargs)
