"""Lifecycle analytics: a history of snapshots turned into the signals of Liu 2026 (compression wave,
depth profile of alpha, Q/K vs V/O asymmetry, timescales, layer importance and pruning). Builds on
:mod:`spectral_plugins.core` only."""
