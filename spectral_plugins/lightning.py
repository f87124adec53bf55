"""Public import path ``spectral_plugins.lightning``: the adapter lives in
:mod:`spectral_plugins.adapters.lightning`."""

from .adapters.lightning import *  # noqa: F403
from .adapters.lightning import __all__  # noqa: F401
