"""Snapshot records, JSON round trip and canonical keys."""

from __future__ import annotations

import json
import math

from spectral_plugins import analyze, layer_key, lifecycle_key, matrix_key
from spectral_plugins.core.keys import attention_key, sanitize
from spectral_plugins.core.snapshot import Snapshot


def test_json_round_trip_is_exact(gpt2_model):
    snapshot = analyze(gpt2_model, step=25)
    text = snapshot.to_json()
    json.loads(text)  # strict JSON: no NaN literals
    again = Snapshot.from_json(text)
    assert again.step == 25 and again.method == snapshot.method
    for a, b in zip(snapshot.layers, again.layers):
        for field in ("alpha", "stable_rank", "effective_rank", "spectral_norm", "xmin", "ks_distance"):
            x, y = getattr(a, field), getattr(b, field)
            assert (math.isnan(x) and math.isnan(y)) or x == y
        assert (a.key, a.depth, a.role, a.shape, a.n_tail) == (b.key, b.depth, b.role, b.shape, b.n_tail)


def test_records_and_scalars_use_canonical_keys(gpt2_model):
    snapshot = analyze(gpt2_model, step=3)
    records = snapshot.to_records()
    assert len(records) == len(snapshot) and records[0]["step"] == 3
    assert "eigenvalues" not in records[0]
    scalars = snapshot.scalars(["alpha", "stable_rank"])
    assert scalars["spectral_alpha/L02_q"] == snapshot.layer("L02_q").alpha
    assert scalars["spectral_stable_rank/embed"] == snapshot.layer("embed").stable_rank
    assert len(scalars) == 2 * len(snapshot)
    assert all("." not in key for key in scalars)  # W&B define_metric globs break on '.'


def test_key_builders():
    assert layer_key(3, "q") == "L03_q" and layer_key(12, "mlp_in", 3) == "L012_mlp_in"
    assert layer_key(None, "embed") == "embed"
    assert matrix_key("alpha", "L03_q") == "spectral_alpha/L03_q"
    assert lifecycle_key("wave_front_depth", "qk") == "spectral_lifecycle/wave_front_depth/qk"
    assert attention_key("interaction_norm_max", "L00") == "spectral_attention/interaction_norm_max/L00"
    assert sanitize("h.3.attn[q]") == "h_3_attn_q"
