"""Public import path of :class:`SpectralTracker` (kept for code written against the flat layout); the
code lives in :mod:`spectral_plugins.runtime.tracker`."""

from .runtime.tracker import SpectralTracker

__all__ = ["SpectralTracker"]
