"""Checks of user options shared by the tracker, the background worker and the adapters, so each
option is refused with the same message wherever it is given, and at the moment it is given.

:func:`check_options` checks every setting of a :class:`~spectral_plugins.runtime.tracker.SpectralTracker`
(and so of the Lightning and Hugging Face callbacks, which call it in their constructors). What can
only be checked against the model (``include`` / ``exclude`` / ``roles`` patterns) is checked by
:func:`~spectral_plugins.core.model_map.map_model` when the model is known.

A string where a list of names is expected is one name: ``metrics="alpha"`` means ``("alpha",)``.
Messages use the public option names (an adapter passes its own spelling, e.g. ``publish_heatmaps``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from .engine import METHODS
from .metrics import DEFAULT_SERIES_METRICS, METRIC_NAMES, METRICS
from .roles import ROLES

# The smallest metric history that can thin its older half and still hold a lifecycle (the
# lifecycle's SpectralHistory refuses fewer kept steps).
MIN_HISTORY_STEPS = 8
# Each publisher's outbox: entries kept while its sink is slow or down, and how long closing waits.
DEFAULT_OUTBOX_SIZE = 100
DEFAULT_PUBLISH_TIMEOUT_S = 30.0
# Keyword arguments of attention_bounds that ``attention={...}`` may set (the tracker passes the model
# and its map itself). A test keeps this equal to the signature of attention_bounds.
ATTENTION_OPTIONS: tuple[str, ...] = ("sample_batch", "delta", "seq_len", "gamma", "method", "include_bias",
                                      "logit_scale", "warm_start", "dtype", "call_model")
# ``series=``: the short list of lifecycle / attention series and run-level figures, or every one.
SERIES: tuple[str, ...] = ("headline", "all")
# Heatmaps drawn with ``heatmap=True`` (if published): each image costs ~0.2 s to render.
DEFAULT_HEATMAP_METRICS: tuple[str, ...] = ("alpha", "stable_rank")


@overload
def positive_int(name: str, value: object, optional: Literal[False] = False) -> int: ...
@overload
def positive_int(name: str, value: object, optional: bool) -> int | None: ...
def positive_int(name: str, value: object, optional: bool = False) -> int | None:
    """``value`` if it is an integer >= 1 (or None when ``optional``); else a ValueError naming it."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an integer >= 1" if optional else "an integer >= 1"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def seconds(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number of seconds >= 0; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def name_list(name: str, value: object) -> tuple[str, ...] | None:
    """``value`` as a tuple of names: None stays None, a string is *one* name, any other iterable of
    strings is listed; anything else is a ValueError naming the option."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Mapping) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a name or a list of names, got {value!r}")
    names = tuple(value)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"{name} must hold names (strings), got {bad!r} in {value!r}")
    return names


def metric_list(name: str, value: object, allow_empty: bool = False) -> tuple[str, ...]:
    """The metric names of option ``name`` (None: all of them); an unknown name or an empty list
    (unless ``allow_empty``) is a ValueError naming the option and the valid names."""
    names = name_list(name, value)
    if names is None:
        return METRIC_NAMES
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"{name}: unknown metric name(s) {unknown}; choose from {list(METRIC_NAMES)}")
    if not names and not allow_empty:
        raise ValueError(f"{name} must name at least one metric (None: all of {list(METRIC_NAMES)})")
    return names


def series_metrics(name: str, value: object) -> tuple[str, ...]:
    """The per-matrix series to publish: None -> :data:`~spectral_plugins.core.metrics.DEFAULT_SERIES_METRICS`
    (alpha and stable rank), ``"all"`` -> every metric, else the names given (checked)."""
    if value is None:
        return DEFAULT_SERIES_METRICS
    if value == "all":
        return METRIC_NAMES
    return metric_list(name, value)


@overload
def flag(name: str, value: object, optional: Literal[False] = False) -> bool: ...
@overload
def flag(name: str, value: object, optional: bool) -> bool | None: ...
def flag(name: str, value: object, optional: bool = False) -> bool | None:
    """``value`` if it is True or False (or None when ``optional``); else a ValueError naming it."""
    if (optional and value is None) or isinstance(value, bool):
        return value
    allowed = "True, False or None" if optional else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a ValueError naming the option and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {list(choices)}")
    return value


def history_option(name: str, value: object) -> bool | int:
    """True (the default cap of kept steps), False (no history) or an int >= :data:`MIN_HISTORY_STEPS`."""
    if isinstance(value, bool) or (isinstance(value, int) and value >= MIN_HISTORY_STEPS):
        return value
    raise ValueError(f"{name} must be True, False or the number of snapshots to keep (an integer >= "
                     f"{MIN_HISTORY_STEPS}), got {value!r}")


def heatmap_option(name: str, value: object, metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The metrics to draw as heatmaps: True -> those of :data:`DEFAULT_HEATMAP_METRICS` that are
    published (``metrics``), False -> none, else the listed metric names (a string is one name)."""
    if value is True:
        return tuple(m for m in DEFAULT_HEATMAP_METRICS if m in metrics)
    if value is False or value is None:
        return ()
    return metric_list(name, value, allow_empty=True)


def roles_option(name: str, value: object) -> dict[str, str] | None:
    """``{glob: role}`` with every role one of :data:`~spectral_plugins.core.roles.ROLES` (whether a
    glob matches a matrix is checked when the model is mapped)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping {{glob on module paths: role}}, got {value!r}")
    for pattern, role in value.items():
        if not isinstance(pattern, str) or role not in ROLES:
            raise ValueError(f"{name}={{{pattern!r}: {role!r}}}: a glob (string) to one of {list(ROLES)}")
    return dict(value)


def attention_option(name: str, value: object) -> bool | dict[str, Any]:
    """True, False, or keyword arguments of ``attention_bounds`` (:data:`ATTENTION_OPTIONS`); their
    values are checked by ``attention_bounds`` itself at the first snapshot."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be True, False or a dict of attention_bounds options, got {value!r}")
    unknown = [k for k in value if k not in ATTENTION_OPTIONS]
    if unknown:
        raise ValueError(f"{name}: unknown attention_bounds option(s) {unknown}; choose from "
                         f"{list(ATTENTION_OPTIONS)}")
    return dict(value)


def device_option(name: str, value: object) -> str | torch.device | None:
    """None, or a device torch can parse ("cpu", "cuda:1", a ``torch.device``)."""
    if value is None or isinstance(value, torch.device):
        return value
    try:
        torch.device(value)  # type: ignore[call-overload]  # any object: torch says what is wrong
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name}={value!r} is not a device ({error}); pass e.g. 'cpu' or 'cuda:0'") from None
    return value  # type: ignore[return-value]  # torch took it: a device string (or an int index)


@dataclass(frozen=True)
class Options:
    """Every setting of a tracker after :func:`check_options` (names normalised to tuples). The
    attributes not listed below are the tracker's arguments of the same name.

    Attributes:
        heatmap: the metrics drawn as depth x role heatmaps (resolved from True / False / names).
        history: True, False or the number of snapshots kept.
    """

    every_n_steps: int
    metrics: tuple[str, ...]
    series: str
    heatmap: tuple[str, ...]
    include: tuple[str, ...] | None
    exclude: tuple[str, ...] | None
    roles: dict[str, str] | None
    method: str
    history: bool | int
    attention: bool | dict[str, Any]
    device: str | torch.device | None
    threads: int | None
    background: bool
    distributed: bool | None
    fast_every_n_steps: int | None
    outbox_size: int = DEFAULT_OUTBOX_SIZE
    publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S


def check_options(
    every_n_steps: object = 25,
    metrics: object = None,
    series: object = "headline",
    heatmap: object = True,
    include: object = None,
    exclude: object = None,
    roles: object = None,
    method: object = "auto",
    history: object = True,
    attention: object = False,
    device: object = None,
    threads: object = 1,
    background: object = False,
    distributed: object = None,
    fast_every_n_steps: object = None,
    outbox_size: object = None,
    publish_timeout_s: object = None,
    names: Mapping[str, str] | None = None,
) -> Options:
    """Check every tracker setting; ``names`` maps an option to the caller's public spelling
    (``{"heatmap": "publish_heatmaps"}``) so messages name what the user wrote.

    Raises:
        ValueError: the first bad option, named, with what it accepts.
    """
    def public(option: str) -> str:
        return (names or {}).get(option, option)

    checked_metrics = series_metrics(public("metrics"), metrics)
    return Options(
        every_n_steps=positive_int(public("every_n_steps"), every_n_steps),
        metrics=checked_metrics,
        series=choice(public("series"), series, SERIES),
        heatmap=heatmap_option(public("heatmap"), heatmap, checked_metrics),
        include=name_list(public("include"), include),
        exclude=name_list(public("exclude"), exclude),
        roles=roles_option(public("roles"), roles),
        method=choice(public("method"), method, METHODS),
        history=history_option(public("history"), history),
        attention=attention_option(public("attention"), attention),
        device=device_option(public("device"), device),
        threads=positive_int(public("threads"), threads, optional=True),
        background=flag(public("background"), background),
        distributed=flag(public("distributed"), distributed, optional=True),
        fast_every_n_steps=positive_int(public("fast_every_n_steps"), fast_every_n_steps, optional=True),
        outbox_size=(DEFAULT_OUTBOX_SIZE if outbox_size is None
                     else positive_int(public("outbox_size"), outbox_size)),
        publish_timeout_s=DEFAULT_PUBLISH_TIMEOUT_S if publish_timeout_s is None else seconds(
            public("publish_timeout_s"), publish_timeout_s),
    )
