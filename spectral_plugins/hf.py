"""Public import path ``spectral_plugins.hf``: the adapter lives in
:mod:`spectral_plugins.adapters.hf`."""

from .adapters.hf import *  # noqa: F403
from .adapters.hf import __all__  # noqa: F401
