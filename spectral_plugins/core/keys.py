"""Canonical metric keys, produced here and nowhere else.

Every tracker shows the same names:

- per matrix: ``spectral_<metric>/<layer_key>``, where ``layer_key`` is ``L03_q``, ``L03_mlp_in``,
  ``embed``, ``lm_head``... (depth zero-padded so that sorting by name sorts by depth); a model of
  several stacks prefixes the stack: ``encoder_L03_q``, ``decoder_L01_cross_k``, ``vision_pos_embed``;
- lifecycle summaries: ``spectral_lifecycle/<name>``;
- attention bounds: ``spectral_attention/<name>/<layer_key>``.

Keys use only letters, digits, ``_`` and ``/``: a ``.`` breaks W&B's ``define_metric`` globs, and
the part before the first ``/`` is the panel section in TensorBoard, W&B and MLflow alike.
"""

from __future__ import annotations

import re

MATRIX_PREFIX = "spectral_"
LIFECYCLE_SECTION = "spectral_lifecycle"
ATTENTION_SECTION = "spectral_attention"
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
