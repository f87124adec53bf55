"""The spectral lifecycle of a training run: history in, lifecycle signals out (Liu 2026).

:class:`SpectralLifecycle` is the stateful front: ``update(snapshot)`` appends to a bounded
:class:`~spectral_plugins.lifecycle.history.SpectralHistory` and returns a :class:`LifecycleState` of this
step's signals; ``summary()`` returns the run-level :class:`LifecycleSummary`. Both give canonical
scalars ``{spectral_lifecycle/<name>[/<group>]: value}`` for publishers. A model of several stacks of
blocks (encoder and decoder, text and vision towers) gets every signal per stack: one wave front,
one alpha depth profile and one Q/K vs V/O index per stack, keyed ``<name>/<stack>_<group>``. The science
lives in pure functions: :mod:`~spectral_plugins.lifecycle.wave`,
:mod:`~spectral_plugins.lifecycle.depth_profile`, :mod:`~spectral_plugins.lifecycle.asymmetry`,
:mod:`~spectral_plugins.lifecycle.timescales`, :mod:`~spectral_plugins.lifecycle.importance`; every
definition is in ``docs/lifecycle.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..core.keys import lifecycle_key
from ..core.snapshot import Snapshot
from . import wave
from .asymmetry import asymmetry_index, depth_variance, trajectory_asymmetry
from .depth_profile import InvertedU, alpha_depth_gradient, delta_alpha, fit_inverted_u, settled_profile
from .history import DEFAULT_MAX_STEPS, DEFAULT_METRICS, ROLE_GROUPS, SpectralHistory
from .importance import BlockImportance, PruningAdvice, advise_pruning, importance_from_history
from .timescales import TwoTimescaleFit, fit_two_timescales

# The fast lane's stable-rank history keeps this many times the full history's steps (one metric, so
# a few MB at most for a model of hundreds of matrices).
WAVE_STEPS_FACTOR = 4


@dataclass(frozen=True)
class LifecycleConfig:
    """Parameters of the lifecycle signals (meanings in ``docs/lifecycle.md``).

    Attributes:
        groups: role groups to report (names of :data:`~spectral_plugins.lifecycle.history.ROLE_GROUPS`).
        lag: snapshots between the two stable ranks of a compression rate.
        rate_floor: a front exists only where the stack's net fall of normalised stable rank is at
            least this fraction of its gross movement (and positive).
        speed_window: defined fronts in the trailing per-snapshot speed.
        reversal_margin: |compression order| a phase must exceed to count (normalised-stable-rank units).
        reversal_patience_steps: steps over which the order must stay negative to confirm a reversal.
        tail_fraction: fraction of the last snapshots averaged into the settled alpha profile.
        inverted_u_level: confidence needed to call a profile an inverted U.
        importance_method: "alpha", "alpha_reversed" or "alpha_drop"
            (:mod:`~spectral_plugins.lifecycle.importance`).
        fit_timescales: whether :meth:`SpectralLifecycle.summary` fits every block matrix's alpha.
    """

    groups: tuple[str, ...] = ("qk", "vo", "mlp", "all")
    lag: int = 1
    rate_floor: float = 0.05
    speed_window: int = 5
    reversal_margin: float = 0.01
    reversal_patience_steps: float = 100.0
    tail_fraction: float = 0.1
    inverted_u_level: float = 0.95
    importance_method: str = "alpha"
    fit_timescales: bool = True

    def __post_init__(self) -> None:
        unknown = [g for g in self.groups if g not in ROLE_GROUPS]
        if unknown:
            raise ValueError(f"unknown role group(s) {unknown}; choose from {list(ROLE_GROUPS)}")


@dataclass(frozen=True, eq=False)  # holds arrays: compare the fields you need
class WaveTrajectory:
    """The compression wave of one role group over the kept steps
    (see :mod:`~spectral_plugins.lifecycle.wave`).

    Attributes:
        group: the role group.
        steps: (T,) steps. depths: (D,) blocks. nsr: (T, D) normalised stable rank.
        front: (T,) wave-front depth (blocks; NaN while idle).
        speed: (T,) trailing front speed (blocks per 1k steps).
        order: (T,) compression order (slope of nsr over relative depth).
        reversal: the first confirmed reversal.
        arrivals: (D,) step of each block's peak compression rate before the reversal.
        wave_speed: blocks per 1k steps from the arrivals; wave_r2: R^2 of that line.
        stack: the stack of blocks (None: a single-stack model).
        wave_stderr: standard error of wave_speed; wave_arrivals: blocks with an arrival;
        wave_note: why the speed or its error is undetermined ("" otherwise).
    """

    group: str
    steps: np.ndarray
    depths: np.ndarray
    nsr: np.ndarray
    front: np.ndarray
    speed: np.ndarray
    order: np.ndarray
    reversal: wave.Reversal
    arrivals: np.ndarray
    wave_speed: float
    wave_r2: float
    stack: str | None = None
    wave_stderr: float = math.nan
    wave_arrivals: int = 0
    wave_note: str = ""


def wave_trajectory(history: SpectralHistory, group: str, config: LifecycleConfig = LifecycleConfig(),
                    full_speed: bool = True, stack: str | None = None, until: float = math.inf
                    ) -> WaveTrajectory:
    """The group's wave signals over every kept step up to ``until`` in one stack (None: the first or
    only one; ``full_speed=False``: trailing speed only at the last step, which is all
    :func:`lifecycle_state` needs). ``history`` needs only ``stable_rank``: it may be the fast lane's
    (:attr:`SpectralLifecycle.waves`)."""
    profile = history.profile("stable_rank", group, normalise=True, stack=stack)
    kept = profile.steps <= until
    steps, depths, nsr = profile.steps[kept], profile.depths, profile.values[kept]
    front = wave.wave_front(steps, depths, nsr, config.lag, config.rate_floor)
    if full_speed:
        speed = wave.trailing_speed(steps, front, config.speed_window)
    else:
        speed = np.full(steps.shape, np.nan)
        if steps.size and np.isfinite(front[-1]):
            recent = np.flatnonzero(np.isfinite(front))[-config.speed_window:]
            speed[-1] = wave.front_speed(steps[recent], front[recent])
    order = wave.compression_order(depths, nsr)
    reversal = wave.detect_reversal(steps, order, config.reversal_margin, config.reversal_patience_steps)
    until = reversal.step if reversal.reversed else math.inf
    arrivals = wave.arrival_steps(steps, nsr, config.lag, until)
    fit = wave.arrival_fit(depths, arrivals)
    return WaveTrajectory(group, steps, depths, nsr, front, speed, order, reversal, arrivals, fit.speed,
                          fit.r2, stack, fit.stderr, fit.arrivals, fit.note)


def alpha_profiles(history: SpectralHistory, group: str, stack: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, depths, alpha (T, D)) of a role group in one stack (None: the first or only one), at
    the steps where alpha was measured (a history read back from a tracker also holds the fast lane's
    stable-rank-only steps)."""
    profile = history.profile("alpha", group, stack=stack)
    if profile.values.size == 0:
        return profile.steps, profile.depths, profile.values
    measured = np.isfinite(profile.values).any(axis=1)
    return profile.steps[measured], profile.depths, profile.values[measured]


def asymmetry_series(history: SpectralHistory, stack: str | None = None, until: float = math.inf
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """(steps, A(t), run-level index) of the Q/K vs V/O asymmetry in one stack (None: the first), over
    the kept steps up to ``until``."""
    kept = history.steps <= until
    var_qk = depth_variance(history.profile("stable_rank", "qk", normalise=True, stack=stack).values[kept])
    var_vo = depth_variance(history.profile("stable_rank", "vo", normalise=True, stack=stack).values[kept])
    return history.steps[kept], asymmetry_index(var_qk, var_vo), trajectory_asymmetry(var_qk, var_vo)


@dataclass(frozen=True)
class GroupState:
    """One role group's signals at one step (NaN where undefined).

    Attributes:
        group: role group.
        front_depth: wave-front depth (blocks).
        front_speed: trailing speed (blocks per 1k steps).
        nsr_mean: mean normalised stable rank over the group.
        nsr_order: compression order.
        reversed: whether a reversal is confirmed so far (None at a fast-lane step, where the
            reversal is not evaluated).
        reversal_step: the step of that reversal.
        delta_alpha: spread of the alpha depth profile.
        alpha_depth_gradient: its slope per full depth.
        stack: the stack of blocks (None: a single-stack model).
    """

    group: str
    front_depth: float
    front_speed: float
    nsr_mean: float
    nsr_order: float
    reversed: bool | None
    reversal_step: float
    delta_alpha: float
    alpha_depth_gradient: float
    stack: str | None = None

    @property
    def label(self) -> str:
        """The group's name in keys: ``qk``, or ``encoder_qk`` in a model of several stacks."""
        return _label(self.stack, self.group)


@dataclass(frozen=True)
class LifecycleState:
    """The lifecycle signals at one step; ``qk_vo_asymmetry`` is the index A(t) (of the first stack;
    ``stack_asymmetry`` holds ``(stack, A(t))`` per stack in a model of several)."""

    step: int
    groups: tuple[GroupState, ...]
    qk_vo_asymmetry: float
    stack_asymmetry: tuple[tuple[str, float], ...] = ()

    def group(self, name: str, stack: str | None = None) -> GroupState:
        """The signals of role group ``name`` (in ``stack``; None: the first stack)."""
        return next(g for g in self.groups if g.group == name and (stack is None or g.stack == stack))

    def scalars(self) -> dict[str, float]:
        """``{spectral_lifecycle/<name>[/<group>]: value}``, finite values only."""
        out = _asymmetry_scalars("qk_vo_asymmetry", self.qk_vo_asymmetry, self.stack_asymmetry)
        for g in self.groups:
            out.update({
                lifecycle_key("wave_front_depth", g.label): g.front_depth,
                lifecycle_key("wave_front_speed", g.label): g.front_speed,
                lifecycle_key("nsr_mean", g.label): g.nsr_mean,
                lifecycle_key("nsr_depth_order", g.label): g.nsr_order,
                lifecycle_key("wave_reversed", g.label): _flag(g.reversed),
                lifecycle_key("wave_reversal_step", g.label): g.reversal_step,
                lifecycle_key("delta_alpha", g.label): g.delta_alpha,
                lifecycle_key("alpha_depth_gradient", g.label): g.alpha_depth_gradient,
            })
        return _finite(out)


def lifecycle_state(history: SpectralHistory, config: LifecycleConfig = LifecycleConfig(),
                    waves: SpectralHistory | None = None) -> LifecycleState:
    """The signals at the history's last step (per stack in a model of several). The stable-rank
    signals (wave front, compression order, reversal, asymmetry) come from ``waves`` up to that step
    when given (the fast lane's denser series), else from ``history``; alpha always from ``history``."""
    if len(history) == 0:
        raise ValueError("the history is empty")
    step = int(history.steps[-1])
    dense = waves is not None and len(waves) > 0 and int(waves.steps[0]) <= step
    return _state(waves if dense and waves is not None else history, step, config, history)


def wave_state(waves: SpectralHistory, config: LifecycleConfig = LifecycleConfig()) -> LifecycleState:
    """The stable-rank signals at the last step of ``waves`` (a fast-lane step), read from its last
    few kept steps so that it stays cheap at every step: the front (from the last ``lag`` steps),
    its trailing speed (the defined fronts among the last ``lag + 4 speed_window`` steps), the mean
    normalised stable rank, the compression order and the asymmetry index. The alpha signals are
    NaN and the reversal (a property of the whole series, published with the full snapshots) is
    None, so :meth:`LifecycleState.scalars` leaves them out."""
    if len(waves) == 0:
        raise ValueError("the history is empty")
    window = config.lag + 4 * config.speed_window
    groups = []
    for stack in waves.stacks:
        for name in config.groups:
            p = waves.profile("stable_rank", name, normalise=True, stack=stack, last=window)
            front = wave.wave_front(p.steps, p.depths, p.values, config.lag, config.rate_floor)
            speed = _last(wave.trailing_speed(p.steps, front, config.speed_window))
            last_nsr = p.values[-1] if p.values.size else np.array([])
            order = _last(wave.compression_order(p.depths, p.values[-1:]))
            groups.append(GroupState(name, _last(front), speed, _nanmean(last_nsr), order, None, math.nan,
                                     math.nan, math.nan, stack))
    def last_variance(group: str, stack: str | None) -> np.ndarray:
        return depth_variance(waves.profile("stable_rank", group, normalise=True, stack=stack, last=1).values)

    per_stack = tuple((stack, _last(asymmetry_index(last_variance("qk", stack), last_variance("vo", stack))))
                      for stack in waves.stacks)
    return LifecycleState(int(waves.steps[-1]), tuple(groups), per_stack[0][1], _named_stacks(per_stack))


def _state(waves: SpectralHistory, step: int, config: LifecycleConfig,
           alphas: SpectralHistory) -> LifecycleState:
    groups = []
    for stack in waves.stacks:
        for name in config.groups:
            w = wave_trajectory(waves, name, config, full_speed=False, stack=stack, until=step)
            last_nsr = w.nsr[-1] if w.nsr.size else np.array([])
            _, depths, alpha = alpha_profiles(alphas, name, stack)
            spread = _last(delta_alpha(alpha[-1:])) if alpha.size else math.nan
            gradient = _last(alpha_depth_gradient(depths, alpha[-1:])) if alpha.size else math.nan
            groups.append(GroupState(name, _last(w.front), _last(w.speed), _nanmean(last_nsr), _last(w.order),
                                     w.reversal.reversed, w.reversal.step, spread, gradient, stack))
    per_stack = tuple((stack, _last(asymmetry_series(waves, stack, until=step)[1])) for stack in waves.stacks)
    return LifecycleState(step, tuple(groups), per_stack[0][1], _named_stacks(per_stack))


@dataclass(frozen=True, eq=False)  # holds arrays: compare the fields you need
class GroupSummary:
    """One role group over the whole run.

    Attributes:
        group: role group.
        num_blocks: depths present.
        wave_speed: arrival-based speed of the compression wave front (blocks per 1k steps).
        wave_r2: R^2 of that arrival fit.
        reversed: whether the wave reversed (late layers ending more compressed than early ones).
        reversal_step: the step of the reversal (the compression order's zero crossing).
        final_nsr_order: compression order (slope of normalised stable rank over depth) at the last step.
        delta_alpha: spread over depth of the settled alpha profile.
        alpha_depth_gradient: least-squares slope of the settled alpha profile against depth.
        settled_alpha: (D,) that profile.
        inverted_u: its quadratic fit.
        tau_fast: median over the group's matrices of the fast timescale of alpha's fit (steps).
        tau_slow: the same for the slow timescale (steps).
        stack: the stack of blocks (None: a single-stack model).
        wave_speed_stderr: standard error of wave_speed (NaN below 3 arrivals).
        wave_arrivals: blocks with an arrival step (the points of the fit).
        wave_note: why the speed or its error is undetermined ("" otherwise).
        reversal_stderr: standard error of reversal_step (steps; NaN when undetermined).
        reversal_note: why there is no reversal or its error is undetermined ("" otherwise).
    """

    group: str
    num_blocks: int
    wave_speed: float
    wave_r2: float
    reversed: bool
    reversal_step: float
    final_nsr_order: float
    delta_alpha: float
    alpha_depth_gradient: float
    settled_alpha: np.ndarray = field(repr=False)
    inverted_u: InvertedU = field(default_factory=InvertedU.undefined)
    tau_fast: float = math.nan
    tau_slow: float = math.nan
    stack: str | None = None
    wave_speed_stderr: float = math.nan
    wave_arrivals: int = 0
    wave_note: str = ""
    reversal_stderr: float = math.nan
    reversal_note: str = ""

    @property
    def label(self) -> str:
        """The group's name in keys: ``qk``, or ``encoder_qk`` in a model of several stacks."""
        return _label(self.stack, self.group)


@dataclass(frozen=True)
class LayerTimescales:
    """The two-timescale fit of one matrix's alpha."""

    key: str
    depth: int | None
    role: str
    fit: TwoTimescaleFit
    stack: str | None = None


@dataclass(frozen=True)
class LifecycleSummary:
    """The run-level lifecycle figures (definitions in ``docs/lifecycle.md``).

    In a model of several stacks, ``groups`` holds every role group of every stack, ``importance``,
    ``advice`` and ``qk_vo_asymmetry`` are the first stack's and ``stacks`` holds each stack's
    ``(name, asymmetry, importance, advice)``.
    """

    step: int
    num_blocks: int
    groups: tuple[GroupSummary, ...]
    qk_vo_asymmetry: float
    timescales: tuple[LayerTimescales, ...]
    importance: BlockImportance
    advice: PruningAdvice
    stacks: tuple[tuple[str, float, BlockImportance, PruningAdvice], ...] = ()

    def group(self, name: str, stack: str | None = None) -> GroupSummary:
        """The figures of role group ``name`` (in ``stack``; None: the first stack)."""
        return next(g for g in self.groups if g.group == name and (stack is None or g.stack == stack))

    def scalars(self) -> dict[str, float]:
        """``{spectral_lifecycle/<name>[/<group or layer key>]: value}``, finite values only."""
        out = _asymmetry_scalars("qk_vo_asymmetry_run", self.qk_vo_asymmetry,
                                 tuple((s[0], s[1]) for s in self.stacks))
        out[lifecycle_key("num_blocks")] = float(self.num_blocks)
        for g in self.groups:
            u = g.inverted_u
            out.update({
                lifecycle_key("wave_speed", g.label): g.wave_speed,
                lifecycle_key("wave_speed_stderr", g.label): g.wave_speed_stderr,
                lifecycle_key("wave_arrivals", g.label): float(g.wave_arrivals),
                lifecycle_key("wave_r2", g.label): g.wave_r2,
                lifecycle_key("wave_reversal_stderr", g.label): g.reversal_stderr,
                lifecycle_key("wave_reversed", g.label): float(g.reversed),
                lifecycle_key("wave_reversal_step", g.label): g.reversal_step,
                lifecycle_key("delta_alpha", g.label): g.delta_alpha,
                lifecycle_key("alpha_depth_gradient", g.label): g.alpha_depth_gradient,
                lifecycle_key("alpha_inverted_u", g.label): float(u.is_inverted_u),
                lifecycle_key("alpha_peak_depth", g.label): u.peak_depth,
                lifecycle_key("alpha_peak_relative_depth", g.label): u.peak_relative_depth,
                lifecycle_key("alpha_peak_confidence", g.label): u.confidence,
                lifecycle_key("alpha_tau_fast", g.label): g.tau_fast,
                lifecycle_key("alpha_tau_slow", g.label): g.tau_slow,
            })
        for layer in self.timescales:
            out[lifecycle_key("alpha_tau_fast", layer.key)] = layer.fit.tau_fast
            out[lifecycle_key("alpha_tau_slow", layer.key)] = layer.fit.tau_slow
        per_stack: list[tuple[str | None, PruningAdvice]] = [(s[0], s[3]) for s in self.stacks]
        per_stack = per_stack or [(None, self.advice)]
        for stack, advice in per_stack:
            for rank, depth in enumerate(advice.order):
                out[lifecycle_key("prune_rank", _label(stack, f"L{depth:02d}"))] = float(rank)
        return _finite(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays as lists, NaN as None) for reports and files."""
        return _jsonable(asdict(self))


def summarize(history: SpectralHistory, config: LifecycleConfig = LifecycleConfig(),
              waves: SpectralHistory | None = None) -> LifecycleSummary:
    """Every run-level lifecycle figure of a history; the stable-rank figures (wave speed, reversal,
    asymmetry) from ``waves`` when given (the fast lane's denser series)."""
    if len(history) == 0:
        raise ValueError("the history is empty")
    waves = waves if waves is not None and len(waves) else history
    timescales = _layer_timescales(history) if config.fit_timescales else ()
    groups = []
    per_stack = []
    for stack in history.stacks:
        for name in config.groups:
            groups.append(_group_summary(history, waves, name, stack, timescales, config))
        importance = importance_from_history(history, config.importance_method, config.tail_fraction,
                                             stack=stack)
        per_stack.append((stack, asymmetry_series(waves, stack)[2], importance,
                          advise_pruning(importance, n_remove=0)))
    _, run_asymmetry, importance, advice = per_stack[0]
    return LifecycleSummary(int(history.steps[-1]), history.num_blocks, tuple(groups), run_asymmetry,
                            timescales, importance, advice, _named_stacks(per_stack))


def _group_summary(history: SpectralHistory, waves: SpectralHistory, name: str, stack: str | None,
                   timescales: tuple[LayerTimescales, ...], config: LifecycleConfig) -> GroupSummary:
    w = wave_trajectory(waves, name, config, full_speed=False, stack=stack)
    _, depths, alpha = alpha_profiles(history, name, stack)
    settled = settled_profile(alpha, config.tail_fraction) if alpha.size else np.array([])
    roles = set(ROLE_GROUPS[name])
    fits = [t.fit for t in timescales if t.role in roles and t.stack == stack and t.fit.ok]
    return GroupSummary(
        name, int(depths.size), w.wave_speed, w.wave_r2, w.reversal.reversed, w.reversal.step,
        _last(w.order), _last(delta_alpha(settled[None, :])) if settled.size else math.nan,
        _last(alpha_depth_gradient(depths, settled[None, :])) if settled.size else math.nan,
        settled, fit_inverted_u(depths, settled, config.inverted_u_level),
        _median([f.tau_fast for f in fits]), _median([f.tau_slow for f in fits]), stack,
        w.wave_stderr, w.wave_arrivals, w.wave_note, w.reversal.stderr, w.reversal.note)


def _layer_timescales(history: SpectralHistory) -> tuple[LayerTimescales, ...]:
    steps, alphas = history.steps, history.values("alpha")
    block_roles = set(ROLE_GROUPS["all"])
    return tuple(LayerTimescales(info.key, info.depth, info.role, fit_two_timescales(steps, alphas[:, j]),
                                 info.stack)
                 for j, info in enumerate(history.matrices)
                 if info.depth is not None and info.role in block_roles)


class SpectralLifecycle:
    """Keeps a bounded history and turns each snapshot into lifecycle signals.

    Full snapshots (:meth:`update`) feed :attr:`history`; the fast lane's stable ranks
    (:meth:`update_fast`, every few steps) feed :attr:`waves`, a denser stable-rank history from which
    the wave front, compression order, reversal and Q/K vs V/O asymmetry are read once it exists, so
    they have the fast lane's step resolution. Alpha and the other full-spectrum signals keep the
    full-snapshot cadence.

    Args:
        config: signal parameters.
        metrics: metrics the history keeps (needs ``stable_rank`` and ``alpha``).
        max_steps: the history's cap on kept steps (the fast-lane history keeps
            :data:`WAVE_STEPS_FACTOR` times as many).
    """

    def __init__(self, config: LifecycleConfig | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
                 max_steps: int = DEFAULT_MAX_STEPS) -> None:
        missing = {"stable_rank", "alpha"} - set(metrics)
        if missing:
            raise ValueError(f"the lifecycle needs metrics {sorted(missing)} in the history")
        self.config = config or LifecycleConfig()
        self.history = SpectralHistory(metrics, max_steps)
        self.waves: SpectralHistory | None = None  # created by the first fast-lane update

    def update(self, snapshot: Snapshot) -> LifecycleState:
        """Append ``snapshot`` (a full one) and return the signals at its step."""
        self.history.append(snapshot)
        return self.state()

    def update_fast(self, snapshot: Snapshot) -> LifecycleState:
        """Append a fast-lane ``snapshot`` (its stable ranks; steps in increasing order, full-snapshot
        steps included) to :attr:`waves` and return the stable-rank signals at its step."""
        if self.waves is None:
            self.waves = SpectralHistory(("stable_rank",), WAVE_STEPS_FACTOR * self.history.max_steps)
        self.waves.append(snapshot)
        return wave_state(self.waves, self.config)

    def state(self) -> LifecycleState:
        """The signals at the last full snapshot's step."""
        return lifecycle_state(self.history, self.config, self.waves)

    def summary(self) -> LifecycleSummary:
        """The run-level figures so far."""
        return summarize(self.history, self.config, self.waves)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: the histories' state and the config."""
        config = asdict(self.config)
        config["groups"] = list(self.config.groups)
        waves = None if self.waves is None else self.waves.to_state()
        return {"history": self.history.to_state(), "config": config, "waves": waves}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (exactly)."""
        config = dict(state["config"])
        config["groups"] = tuple(config["groups"])
        # older checkpoints counted patience in snapshots; their interval is unknown, so the default applies
        config.pop("reversal_patience", None)
        self.config = LifecycleConfig(**config)
        self.history = SpectralHistory.from_state(state["history"])
        waves = state.get("waves")  # absent in checkpoints from before the fast lane
        self.waves = None if waves is None else SpectralHistory.from_state(waves)


def _label(stack: str | None, name: str) -> str:
    return name if stack is None else f"{stack}_{name}"


def _named_stacks(per_stack: Sequence[tuple]) -> tuple:
    """The per-stack entries of a model of several stacks; () for a single-stack model."""
    return tuple(per_stack) if len(per_stack) > 1 else ()


def _asymmetry_scalars(name: str, value: float, per_stack: tuple[tuple[str, float], ...]) -> dict[str, float]:
    """One index, or in a model of several stacks one per stack (``<name>/<stack>``)."""
    if not per_stack:
        return {lifecycle_key(name): value}
    return {lifecycle_key(name, stack): index for stack, index in per_stack}


def _flag(value: bool | None) -> float:
    """1.0 / 0.0, NaN (left out of the scalars) for None: not evaluated."""
    return math.nan if value is None else float(value)


def _finite(values: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def _last(values: np.ndarray) -> float:
    return float(values[-1]) if np.size(values) else math.nan


def _nanmean(values: np.ndarray) -> float:
    finite = np.asarray(values)[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
