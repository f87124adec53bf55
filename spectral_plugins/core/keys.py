"""Canonical metric keys, produced here and nowhere else.

Every tracker shows the same names:

- per matrix: ``spectral_<metric>/<layer_key>``, where ``layer_key`` is ``L03_q``, ``L03_mlp_in``,
  ``embed``, ``lm_head``... (depth zero-padded so that sorting by name sorts by depth); a model of
  several stacks prefixes the stack: ``encoder_L03_q``, ``decoder_L01_cross_k``, ``vision_pos_embed``;
- lifecycle signals per step: ``spectral_lifecycle/<name>`` or ``spectral_lifecycle/<name>/<group>``;
- run-level figures (one value per run, never a time series): ``spectral_run/<name>[_<group>]``, one
  ``/`` only, so that MLflow (which sections by the prefix before the *last* ``/``) shows them in one
  section as W&B and TensorBoard do;
- lifecycle map images: ``spectral_map/<metric>``;
- attention bounds: ``spectral_attention/<name>/<layer_key>``.

Keys use only letters, digits, ``_`` and ``/``: a ``.`` breaks W&B's ``define_metric`` globs, and
the part before the first ``/`` is the panel section in TensorBoard, W&B and MLflow alike.
"""

from __future__ import annotations

import re

MATRIX_PREFIX = "spectral_"
LIFECYCLE_SECTION = "spectral_lifecycle"
ATTENTION_SECTION = "spectral_attention"
RUN_SECTION = "spectral_run"
MAP_SECTION = "spectral_map"
STEP_KEY = "spectral/step"

_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


def sanitize(text: str) -> str:
    """Replace every run of characters other than letters, digits and ``_`` by one ``_``."""
    return _UNSAFE.sub("_", text).strip("_")


def layer_key(depth: int | None, role: str, depth_digits: int = 2, stack: str | None = None) -> str:
    """The short id of a matrix: ``L03_q`` for a block matrix, the role alone otherwise; in a model of
    several stacks, prefixed by the stack's name (``encoder_L03_q``, ``vision_pos_embed``)."""
    base = role if depth is None else f"L{depth:0{depth_digits}d}_{role}"
    return base if stack is None else f"{stack}_{base}"


def matrix_key(metric: str, key: str) -> str:
    """``spectral_<metric>/<layer_key>``: one section per metric, one line per matrix."""
    return f"{MATRIX_PREFIX}{metric}/{key}"


def lifecycle_key(name: str, group: str | None = None) -> str:
    """``spectral_lifecycle/<name>`` or, per role group, ``spectral_lifecycle/<name>/<group>``."""
    return f"{LIFECYCLE_SECTION}/{name}" if group is None else f"{LIFECYCLE_SECTION}/{name}/{group}"


def attention_key(name: str, key: str) -> str:
    """``spectral_attention/<name>/<layer_key>``."""
    return f"{ATTENTION_SECTION}/{name}/{key}"


def run_key(name: str, group: str | None = None) -> str:
    """``spectral_run/<name>`` or ``spectral_run/<name>_<group>``: a run-level figure."""
    return f"{RUN_SECTION}/{name}" if group is None else f"{RUN_SECTION}/{name}_{group}"


def map_key(metric: str) -> str:
    """``spectral_map/<metric>``: the lifecycle map image of a metric (depth x training step)."""
    return f"{MAP_SECTION}/{metric}"
