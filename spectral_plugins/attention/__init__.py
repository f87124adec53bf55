"""Attention logit bounds (Emadi 2026): per-head norms of W_Q W_K^T, deterministic and rank-aware
bounds, FP8 scale factors. Builds on :mod:`spectral_plugins.core` only."""

from .bounds import ATTENTION_METRICS, AttentionBounds, HeadBound, LayerBound, attention_bounds

__all__ = ["ATTENTION_METRICS", "AttentionBounds", "HeadBound", "LayerBound", "attention_bounds"]
