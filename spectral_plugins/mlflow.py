"""Public import path ``spectral_plugins.mlflow``: the adapter lives in
:mod:`spectral_plugins.adapters.mlflow`."""

from .adapters.mlflow import *  # noqa: F403
from .adapters.mlflow import __all__  # noqa: F401
