"""spectral-plugins: watch the spectral lifecycle of transformer weights inside your experiment tracker.

The core (this package's top level) never imports a tracker; each adapter lives in its own module
(``spectral_plugins.lightning``, ``.tensorboard``, ``.wandb``, ``.mlflow``) and imports its library
lazily.
"""

from .attention import ATTENTION_METRICS, AttentionBounds, HeadBound, LayerBound, attention_bounds
from .background import BackgroundSnapshotter, SnapshotterStats
from .distributed import DistributedAnalyzer, distributed_analyze
from .engine import SpectralEngine, analyze
from .history import SpectralHistory
from .importance import BlockImportance, PruningAdvice, advise_pruning, importance_from_history
from .keys import layer_key, lifecycle_key, matrix_key
from .lifecycle import LifecycleConfig, LifecycleState, LifecycleSummary, SpectralLifecycle, summarize
from .metrics import METRICS, MetricSpec, PowerLawFit, fit_alpha
from .model_map import MatrixRef, ModelMap, map_model, map_state_dict
from .pruning import PruningEvaluation, evaluate_pruning, skip_blocks
from .roles import ROLES
from .snapshot import LayerSpectrum, Snapshot
from .tracker import SpectralTracker

__version__ = "0.1.0"

__all__ = [
    "SpectralTracker",
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
