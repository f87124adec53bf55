"""spectral-plugins: watch the spectral lifecycle of transformer weights inside your experiment tracker.

The core (this package's top level) never imports a tracker; each adapter lives in its own module
(``spectral_plugins.lightning``, ``.tensorboard``, ``.wandb``, ``.mlflow``) and imports its library
lazily.
"""

from .attention.bounds import ATTENTION_METRICS, AttentionBounds, HeadBound, LayerBound, attention_bounds
from .core.engine import SpectralEngine, analyze
from .core.keys import layer_key, lifecycle_key, matrix_key
from .core.metrics import METRICS, MetricSpec, PowerLawFit, fit_alpha
from .core.model_map import MatrixRef, ModelMap, map_model, map_state_dict
from .core.roles import ROLES
from .core.snapshot import LayerSpectrum, Snapshot
from .lifecycle.history import SpectralHistory
from .lifecycle.importance import BlockImportance, PruningAdvice, advise_pruning, importance_from_history
from .lifecycle.pruning import PruningEvaluation, evaluate_pruning, skip_blocks
from .lifecycle.signals import LifecycleConfig, LifecycleState, LifecycleSummary, SpectralLifecycle, summarize
from .runs.compare import Comparison, compare_runs
from .runtime.background import BackgroundSnapshotter, SnapshotterStats
from .runtime.distributed import DistributedAnalyzer, distributed_analyze
from .runtime.tracker import SpectralTracker

__version__ = "0.1.0"

__all__ = [
    "SpectralTracker",
    "Comparison",
    "compare_runs",
    "BackgroundSnapshotter",
    "DistributedAnalyzer",
    "SnapshotterStats",
    "distributed_analyze",
    "BlockImportance",
    "LifecycleConfig",
    "LifecycleState",
    "LifecycleSummary",
    "PruningAdvice",
    "PruningEvaluation",
    "SpectralHistory",
    "SpectralLifecycle",
    "advise_pruning",
    "evaluate_pruning",
    "importance_from_history",
    "skip_blocks",
    "summarize",
    "ATTENTION_METRICS",
    "AttentionBounds",
    "HeadBound",
    "LayerBound",
    "attention_bounds",
    "METRICS",
    "ROLES",
    "LayerSpectrum",
    "MatrixRef",
    "MetricSpec",
    "ModelMap",
    "PowerLawFit",
    "Snapshot",
    "SpectralEngine",
    "analyze",
    "fit_alpha",
    "layer_key",
    "lifecycle_key",
    "map_model",
    "map_state_dict",
    "matrix_key",
]
