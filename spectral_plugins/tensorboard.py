"""Public import path ``spectral_plugins.tensorboard``: the adapter lives in
:mod:`spectral_plugins.adapters.tensorboard`."""

from .adapters.tensorboard import *  # noqa: F403
from .adapters.tensorboard import __all__  # noqa: F401
