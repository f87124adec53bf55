"""The tracker's fast lane: cheap per-matrix metrics between full snapshots, and its honesty check.

Every ``fast_every_n_steps`` steps that are not full-snapshot steps, :class:`FastLaneRunner` measures
stable rank (and the spectral and Frobenius norms, when the run publishes them) of every matrix with
:class:`~spectral_plugins.core.fast_lane.FastLane` and turns the result into a scalars-only
:class:`~spectral_plugins.runtime.publishing.StepReport` (``full=False``) under the same keys as the
full snapshots, so each per-matrix series simply gains points. At each full snapshot the lane is
measured too, unpublished, and the largest relative disagreement with the exact values is published
as ``spectral_fast/max_rel_error`` (:data:`HONESTY_KEY`); a matrix whose fast value is below the exact
top singular value by more than the lane's tolerance restarts from a random vector (its warm start
followed an eigenvector that is no longer the top; counted in ``restarted``).

The lane runs on the training thread in every mode (it costs a few matrix-vector products per
matrix). Under torch.distributed (a tracker on every rank, replicated weights as under DDP) each
rank measures its share of the matrices (balanced by ``m n``, the cost of one product) and rank 0
gathers the shares (one ``gather_object`` of a few numbers per matrix, at the same steps on every
rank); sharded (DTensor) weights turn the lane off with one warning. A failure warns once, is
counted (a rank that fails sends nothing and its matrices are NaN at that step), and never reaches
training.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import replace

import torch.distributed as dist

from ..core.fast_lane import FAST_METRICS, FastLane, FastMeasure, fast_lane_error, merge_measures, off_top
from ..core.model_map import ModelMap
from ..core.snapshot import Snapshot
from .distributed import assign_ranks
from .publishing import StepReport

log = logging.getLogger("spectral_plugins")

HONESTY_KEY = "spectral_fast/max_rel_error"


class FastLaneRunner:
    """Measures the fast lane for a tracker and builds its reports.

    Args:
        model_map: the tracker's matrices.
        every_n_steps: measure at every multiple of it.
        metrics: the run's published metrics; the lane publishes those of
            :data:`~spectral_plugins.core.fast_lane.FAST_METRICS` among them.
        per_expert: publish every expert matrix too, not only the per-layer aggregates (as the
            full snapshots do).
        distributed: share the matrices across the ranks of the default process group (every rank
            runs a runner and calls it at the same steps; rank 0 gets the reports).
    """

    def __init__(self, model_map: ModelMap, every_n_steps: int, metrics: tuple[str, ...],
                 per_expert: bool = False, distributed: bool = False) -> None:
        self.model_map, self.every_n_steps, self.per_expert = model_map, every_n_steps, per_expert
        self.metrics = tuple(m for m in FAST_METRICS if m in metrics)
        self.lane: FastLane | None = None  # this rank's share (all of the map in a single process)
        self.ranks, self.rank = 1, 0
        self.measured = 0
        self.failed = 0
        self.restarted = 0  # warm starts forgotten after a full snapshot showed them off the top
        self.last_step: int | None = None
        self.last_error = math.nan
        self._checks: dict[int, FastMeasure] = {}  # unpublished measures at full-snapshot steps
        sharded = [ref.name for ref in model_map.matrices if type(ref.source).__name__ == "DTensor"]
        if sharded:
            warnings.warn(f"spectral-plugins: the fast lane is off for sharded (DTensor) weights "
                          f"({sharded[0]}, ...); full snapshots continue", RuntimeWarning, stacklevel=3)
        elif not self.metrics:
            log.info("fast lane: none of %s is published (metrics=...); it stays off", FAST_METRICS)
        else:
            share = model_map
            if distributed:
                self.ranks, self.rank = dist.get_world_size(), dist.get_rank()
                owners = assign_ranks([ref.shape[0] * ref.shape[1] for ref in model_map.matrices], self.ranks)
                share = replace(model_map, matrices=tuple(
                    ref for ref, owner in zip(model_map.matrices, owners) if owner == self.rank))
            self.lane = FastLane(share)

    def due(self, step: int) -> bool:
        """Whether ``step`` is a fast-lane step not measured yet."""
        return (self.lane is not None and step % self.every_n_steps == 0
                and (self.last_step is None or step > self.last_step))

    def report(self, step: int) -> StepReport | None:
        """The scalars-only report of the lane at ``step`` (None if the measurement failed)."""
        measure = self._measure(step)
        if measure is None:
            return None
        return StepReport(step=step, snapshot=measure.to_snapshot(self.model_map), metrics=self.metrics,
                          heatmap_metrics=(), per_expert=self.per_expert, full=False)

    def measure_for_check(self, step: int) -> Snapshot | None:
        """Measure (unpublished) at a full-snapshot step, to compare with the exact values later;
        the measurement as a snapshot (for the analyses' fast series), or None."""
        if self.lane is None:
            return None
        measure = self._measure(step)
        if measure is None:
            return None
        self._checks[step] = measure
        return measure.to_snapshot(self.model_map)

    def check(self, snapshot: Snapshot) -> dict[str, float]:
        """``{HONESTY_KEY: largest relative error}`` of the lane against ``snapshot`` over the
        published fast metrics, or nothing when the lane was not measured at that step."""
        measure = self._checks.pop(int(snapshot.step or 0), None)
        for step in [s for s in self._checks if s < int(snapshot.step or 0)]:
            del self._checks[step]  # skipped full snapshots (background mode) never come
        if measure is None:
            return {}
        if self.lane is not None:  # repair: matrices that lost the top restart from a random vector
            stuck = off_top(measure, snapshot, self.lane.tol)
            restarted = self.lane.restart(stuck)  # under torch.distributed: rank 0's share only
            if restarted:
                self.restarted += restarted
                log.info("fast lane at step %s: %s below the exact top singular value; restarted %d "
                         "from a random vector", snapshot.step, ", ".join(stuck[:5]), restarted)
        errors = [fast_lane_error(measure, snapshot, metric) for metric in self.metrics]
        finite = [e for e in errors if math.isfinite(e)]
        if not finite:
            return {}
        self.last_error = max(finite)
        return {HONESTY_KEY: self.last_error}

    def _measure(self, step: int) -> FastMeasure | None:
        """The lane at ``step``: this rank's share, gathered to rank 0 under torch.distributed (every
        rank takes part whatever fails locally); None where nothing is to be published."""
        assert self.lane is not None
        self.last_step = step
        try:
            measure: FastMeasure | None = self.lane.measure(step)
        except Exception as error:  # noqa: BLE001 - monitoring must never break training
            measure = None
            log.debug("fast lane at step %s failed", step, exc_info=True)
            self._failed(step, f"{type(error).__name__}: {error}")
        if self.ranks > 1:
            shares: list[FastMeasure | None] | None = [None] * self.ranks if self.rank == 0 else None
            dist.gather_object(measure, shares, dst=0)
            if shares is None:
                return None
            lost = [rank for rank, share in enumerate(shares) if share is None and rank != self.rank]
            if lost:
                self._failed(step, f"rank(s) {lost} sent no share; their matrices are NaN at this step")
            if all(share is None for share in shares):
                return None
            measure = merge_measures(self.model_map, shares, step)
        if measure is None:
            return None
        self.measured += 1
        return measure

    def _failed(self, step: int, why: str) -> None:
        self.failed += 1
        if self.failed == 1:
            warnings.warn(f"spectral-plugins: the fast lane failed at step {step} ({why}); it is tried "
                          "again at its next step, full snapshots continue", RuntimeWarning, stacklevel=5)
