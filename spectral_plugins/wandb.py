"""Public import path ``spectral_plugins.wandb``: the adapter lives in
:mod:`spectral_plugins.adapters.wandb`."""

from .adapters.wandb import *  # noqa: F403
from .adapters.wandb import __all__  # noqa: F401
