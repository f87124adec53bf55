"""Snapshots under torch.distributed: each rank computes its cost-balanced share, rank 0 assembles.

::

    analyzer = DistributedAnalyzer(SpectralEngine())        # once, on every rank
    snapshot = analyzer.analyze(model_map, step=step)        # on every rank, at the same steps
    if snapshot is not None:                                 # the destination rank (0) only
        publish(snapshot)

- Work is assigned in units of *source tensors* (a fused q/k/v projection or a tied matrix is one
  unit, so each parameter is materialised on one rank only), by greedy longest-processing-time
  balancing of the estimated cost ``m n k + k^3`` (``k = min(m, n)``) per matrix; the assignment is
  a pure function of the map, so every rank computes the same one without communicating.
- DDP (replicated weights): a rank reads its own share of the live weights; no weight traffic.
- FSDP2 / DTensor (``fully_shard``): a 1-D ``Shard(d)`` parameter is gathered to its owner only
  (``dist.gather`` of the padded shards, one per unit, every rank in the same order); other
  placements (HSDP, tensor parallel) fall back to ``full_tensor()`` on every rank, owner keeps it.
  Peak extra memory on a rank: the full matrices of its own share.
- FSDP1 (``FullyShardedDataParallel``): pass the wrapped *module*; the parameters are unsharded
  with ``summon_full_params(writeback=False)`` for the call and mapped inside it. Limitation: FSDP1
  unshards everything on every rank at once (its own granularity), so peak memory is a full copy of
  the weights per rank; FSDP2 does not have this cost.
- Results (:class:`~spectral_plugins.core.snapshot.LayerSpectrum` records, bit-identical to a single
  process) are gathered to ``dst`` with ``gather_object``. A rank whose computation raises sends an
  error marker instead; ``dst`` fills NaN metrics (``finite=False``) for its matrices and warns once.
  Every rank issues the same collectives in the same order whatever fails locally. (A rank that
  dies or a broken connection is left to the process group's timeout.)

Under NCCL, ``gather_object`` needs ``torch.cuda.set_device(local_rank)`` to have been called (as
every NCCL program does). Call :meth:`DistributedAnalyzer.analyze` from the training thread of each
rank, between optimizer steps, never concurrently with other collectives on the same group.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..core.engine import SpectralEngine
from ..core.model_map import MatrixRef, ModelMap, map_model
from ..core.snapshot import LayerSpectrum, Snapshot

if TYPE_CHECKING:  # imported lazily at run time: torch < 2.4 has it elsewhere (_dtensor_types)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    _DTensorTypes = tuple[type[DTensor], type[Replicate], type[Shard]]

log = logging.getLogger("spectral_plugins")


def matrix_cost(shape: Sequence[int]) -> float:
    """Estimated cost of one matrix's spectrum: ``m n k`` (Gram product) + ``k^3`` (eigensolver)."""
    m, n = int(shape[0]), int(shape[1])
    k = min(m, n)
    return float(m * n * k + k**3)


def assign_ranks(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: units in decreasing cost (ties by index) each go to
    the least-loaded rank (ties to the lowest rank). Deterministic: every rank gets the same answer."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]
    for unit in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[unit] = rank
        heapq.heappush(loads, (load + float(costs[unit]), rank))
    return owners


@dataclass(frozen=True)
class Unit:
    """The matrices viewing one source tensor, and the rank that computes them."""

    source: torch.Tensor
    refs: tuple[MatrixRef, ...]
    cost: float
    owner: int


def plan(model_map: ModelMap, world_size: int) -> list[Unit]:
    """The units of a map (source tensors in map order) with their cost-balanced owners."""
    grouped: dict[int, list[MatrixRef]] = {}
    sources: dict[int, torch.Tensor] = {}
    for ref in model_map.matrices:
        tensor = ref.source
        grouped.setdefault(id(tensor), []).append(ref)
        sources[id(tensor)] = tensor
    costs = [sum(matrix_cost(r.shape) for r in refs) for refs in grouped.values()]
    owners = assign_ranks(costs, world_size)
    return [Unit(sources[key], tuple(refs), cost, owner)
            for (key, refs), cost, owner in zip(grouped.items(), costs, owners)]


@dataclass(frozen=True)
class _Share:
    """What one rank sends to the destination: its layers, or why it has none."""

    rank: int
    layers: tuple[LayerSpectrum, ...] = ()
    dtype: str | None = None
    device: str | None = None
    seconds: float = 0.0
    error: str | None = None
    bad_names: tuple[str, ...] = ()  # matrices (maybe owned elsewhere) this rank could not send a shard of


class DistributedAnalyzer:
    """Computes snapshots across the ranks of a process group; keep one per run on every rank.

    Args:
        engine: the engine each rank uses for its share.
        group: the process group (default: the world).
        dst: the rank (within ``group``) that receives the snapshot.
        map_fn: maps a module passed to :meth:`analyze` (default :func:`~spectral_plugins.map_model`;
            pass ``functools.partial(map_model, include=...)`` for options).

    Attributes:
        failures: how many rank shares failed so far (seen on ``dst``).
        last_rank_seconds: per rank, the seconds its share took at the last call (on ``dst``).
    """

    def __init__(self, engine: SpectralEngine, group: dist.ProcessGroup | None = None, dst: int = 0,
                 map_fn: Callable[[nn.Module], ModelMap] = map_model) -> None:
        self.engine = engine
        self.group = group
        self.dst = dst
        self.map_fn = map_fn
        self.failures = 0
        self.last_rank_seconds: tuple[float, ...] = ()

    def analyze(self, model_or_map: nn.Module | ModelMap, step: int | None = None) -> Snapshot | None:
        """The snapshot of every mapped matrix on ``dst``, None on the other ranks. Without an
        initialised process group this is ``engine.analyze``. Collective: call it on every rank."""
        if not (dist.is_available() and dist.is_initialized()):
            model_map = model_or_map if isinstance(model_or_map, ModelMap) else self.map_fn(model_or_map)
            return self.engine.analyze(model_map, step=step)
        if isinstance(model_or_map, ModelMap):
            return self._analyze_map(model_or_map, step)
        module = _unwrap_ddp(model_or_map)
        with _fsdp1_full_params(module):
            return self._analyze_map(self.map_fn(module), step)

    def _analyze_map(self, model_map: ModelMap, step: int | None) -> Snapshot | None:
        started = time.perf_counter()
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        units = plan(model_map, world)
        mine = [unit for unit in units if unit.owner == rank]
        full, bad = _materialise(units, rank, self.group)  # collectives: the same on every rank
        try:
            refs = tuple(ref.with_source(full[i]) for i, unit in enumerate(units) if unit.owner == rank
                         for ref in unit.refs)
            share = self._compute(rank, model_map, refs, step) if mine else _Share(rank)
        except Exception as error:  # noqa: BLE001 - report it; the collective below must still happen
            log.debug("spectral share of rank %d failed", rank, exc_info=True)
            share = _Share(rank, error=f"{type(error).__name__}: {error}")
        del full
        if bad:
            share = replace(share, bad_names=tuple(r.name for i in bad for r in units[i].refs),
                            error=share.error or f"could not send its shard of {len(bad)} matrices")
        return self._gather(model_map, share, step, started)

    def local_share(self, model_map: ModelMap) -> ModelMap:
        """This rank's share of a map whose weights are replicated on every rank (DDP, or no wrapper):
        the matrices it computes, viewing the live weights. For a background worker that computes the
        share between steps (then :meth:`gather_share` at a later step, on every rank).

        Raises:
            ValueError: the map holds sharded (DTensor / FSDP) weights, which need the collectives
                of :meth:`analyze` to be materialised.
        """
        types = _dtensor_types()
        if types is not None and any(isinstance(ref.source, types[0]) for ref in model_map.matrices):
            raise ValueError("the model's weights are sharded (DTensor / FSDP); a rank cannot compute its "
                             "share from local weights: use DistributedAnalyzer.analyze")
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        refs = tuple(ref for unit in plan(model_map, world) if unit.owner == rank for ref in unit.refs)
        return replace(model_map, matrices=refs)

    def gather_share(self, model_map: ModelMap, share: Snapshot | None, step: int | None,
                     error: str | None = None) -> Snapshot | None:
        """Collective: every rank's snapshot of its :meth:`local_share` of ``model_map`` (None, with
        ``error``, when its computation failed) to ``dst``, which returns the assembled snapshot of
        the whole map tagged ``step``; None on the other ranks."""
        started = time.perf_counter()
        rank = dist.get_rank(self.group)
        if share is not None:
            sent = _Share(rank, share.layers, share.dtype, share.device, share.seconds)
        elif self.local_share(model_map).matrices:
            sent = _Share(rank, error=error or "its share was not computed")
        else:
            sent = _Share(rank)  # it owns nothing (more ranks than source tensors)
        return self._gather(model_map, sent, step, started)

    def _gather(self, model_map: ModelMap, share: _Share, step: int | None,
                started: float) -> Snapshot | None:
        world = dist.get_world_size(self.group)
        dst_global = self._global(self.dst)
        gathered: list[_Share | None] | None = [None] * world if dist.get_rank() == dst_global else None
        dist.gather_object(share, gathered, dst=dst_global, group=self.group)
        if gathered is None:
            return None
        return self._assemble(model_map, [s for s in gathered if s is not None], step, started)

    def _compute(self, rank: int, model_map: ModelMap, refs: tuple[MatrixRef, ...],
                 step: int | None) -> _Share:
        snapshot = self.engine.analyze(replace(model_map, matrices=refs), step=step)
        return _Share(rank, snapshot.layers, snapshot.dtype, snapshot.device, snapshot.seconds)

    def _assemble(self, model_map: ModelMap, shares: list[_Share], step: int | None,
                  started: float) -> Snapshot:
        bad = {name for share in shares for name in share.bad_names}
        by_name = {layer.name: layer for share in shares for layer in share.layers if layer.name not in bad}
        failed = [share for share in shares if share.error is not None]
        if failed:
            if self.failures == 0:
                warnings.warn(
                    "spectral-plugins: the spectral share of rank(s) "
                    f"{[s.rank for s in failed]} failed ({failed[0].error}); their matrices have NaN "
                    "metrics (finite=False), the others are exact. Later failures are only counted "
                    "(DistributedAnalyzer.failures).", RuntimeWarning, stacklevel=4)
            self.failures += len(failed)
        layers = tuple(by_name[ref.name] if ref.name in by_name else failed_layer(ref)
                       for ref in model_map.matrices)
        self.last_rank_seconds = tuple(s.seconds for s in sorted(shares, key=lambda s: s.rank))
        header = next((s for s in shares if s.layers), None)
        dtype = header.dtype if header else str(self.engine.dtype or torch.float64).removeprefix("torch.")
        return Snapshot(step=step, layers=layers, method=self.engine.method, dtype=dtype or "float64",
                        device=(header.device if header else None) or "cpu",
                        seconds=time.perf_counter() - started)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


def distributed_analyze(engine: SpectralEngine, model_map: nn.Module | ModelMap,
                        group: dist.ProcessGroup | None = None, step: int | None = None,
                        dst: int = 0) -> Snapshot | None:
    """One-off :meth:`DistributedAnalyzer.analyze`: the snapshot on ``dst``, None elsewhere."""
    return DistributedAnalyzer(engine, group=group, dst=dst).analyze(model_map, step=step)


def failed_layer(ref: MatrixRef) -> LayerSpectrum:
    """The record of a matrix whose computation failed: NaN metrics, ``finite=False``."""
    nan = math.nan
    return LayerSpectrum(
        name=ref.name, key=ref.key, module_name=ref.module_name, depth=ref.depth, role=ref.role,
        stack=ref.stack, expert=ref.expert,
        shape=ref.shape, spectral_norm=nan, frobenius_norm=nan, stable_rank=nan, effective_rank=nan,
        alpha=nan, alpha_weighted=nan, xmin=nan, ks_distance=nan, n_tail=0, sigma_alpha=nan,
        lambda_max=nan, finite=False, precision_floor=nan, n_below_floor=0,
    )


# ---------------------------------------------------------------------- materialising weights
def _dtensor_types() -> _DTensorTypes | None:
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch < 2.4
        try:
            from torch.distributed._tensor import DTensor, Replicate, Shard
        except ImportError:
            return None
    return DTensor, Replicate, Shard


def _materialise(units: list[Unit], rank: int,
                 group: dist.ProcessGroup | None) -> tuple[dict[int, torch.Tensor], tuple[int, ...]]:
    """The full source tensor of each unit this rank owns, by unit index; and the units this rank could not
    contribute its shard to (their matrices are reported failed). Every rank walks the units in the
    same order and joins the same collectives (only DTensor units communicate)."""
    types = _dtensor_types()
    owner_globals = [unit.owner if group is None else dist.get_global_rank(group, unit.owner)
                     for unit in units]
    full: dict[int, torch.Tensor] = {}
    bad: list[int] = []
    for i, (unit, owner) in enumerate(zip(units, owner_globals)):
        tensor = unit.source.detach()
        if types is not None and isinstance(tensor, types[0]):
            gathered, ok = _gather_dtensor(tensor, owner, types)
            if gathered is not None:
                full[i] = gathered
            if not ok:
                bad.append(i)
        elif unit.owner == rank:
            full[i] = tensor
    return full, tuple(bad)


def _gather_dtensor(tensor: DTensor, owner: int,
                    types: _DTensorTypes) -> tuple[torch.Tensor | None, bool]:
    """The full tensor of a DTensor on global rank ``owner`` (None on the others), and whether this
    rank's shard went into it intact."""
    _, replicate, shard = types
    me = dist.get_rank()
    mesh, placements = tensor.device_mesh, tensor.placements
    if all(isinstance(p, replicate) for p in placements):
        return (tensor.to_local() if me == owner else None), True
    if mesh.ndim == 1 and type(placements[0]) is shard:
        mesh_group = mesh.get_group()
        members = dist.get_process_group_ranks(mesh_group)
        if owner in members:
            return _gather_shards(tensor, placements[0].dim, owner, me, members, mesh_group)
    full = tensor.full_tensor()  # any other layout: a collective on every rank, the owner keeps it
    return (full if me == owner else None), True


def _gather_shards(tensor: DTensor, dim: int, owner: int, me: int, members: list[int],
                   group: dist.ProcessGroup) -> tuple[torch.Tensor | None, bool]:
    """Gather the ``torch.chunk``-style shards of a 1-D-mesh DTensor along ``dim`` to ``owner``: each
    is padded to the largest shard size for the collective and trimmed on arrival. A rank whose shard
    is not what chunking predicts (or cannot be prepared) sends zeros and reports it, so the
    collective still happens everywhere."""
    shape = tuple(tensor.shape)
    dim = dim % len(shape)
    chunk = -(-shape[dim] // len(members))
    sizes = [max(0, min(chunk, shape[dim] - i * chunk)) for i in range(len(members))]
    padded = list(shape)
    padded[dim] = chunk
    try:
        local = tensor.to_local()
        if local.shape[dim] != sizes[members.index(me)] or local.shape[:dim] + local.shape[dim + 1:] != \
                torch.Size(shape[:dim] + shape[dim + 1:]):
            raise ValueError(f"local shard {tuple(local.shape)} is not the chunk of {shape} along {dim}")
        if local.shape[dim] == chunk:
            send = local.contiguous()
        else:  # a short (or empty) last shard
            send = local.new_zeros(padded)
            send.narrow(dim, 0, local.shape[dim]).copy_(local)
        ok = True
    except Exception:  # noqa: BLE001 - the collective below must still happen on every rank
        log.debug("could not prepare a shard for the spectral gather", exc_info=True)
        send = torch.zeros(padded, dtype=tensor.dtype, device=tensor.device)
        ok = False
    received = [torch.empty_like(send) for _ in members] if me == owner else None
    dist.gather(send, received, dst=owner, group=group)
    if received is None:
        return None, ok
    return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(received, sizes)], dim=dim), ok


def _unwrap_ddp(module: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` (so matrix names match a single process)."""
    ddp = getattr(nn.parallel, "DistributedDataParallel", None)
    return module.module if ddp is not None and isinstance(module, ddp) else module


@contextlib.contextmanager
def _fsdp1_full_params(module: nn.Module) -> Iterator[None]:
    """FSDP1: every parameter unsharded (not written back) for the duration; other models: nothing."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        yield
        return
    if not any(isinstance(m, FSDP) for m in module.modules()):
        yield
        return
    with FSDP.summon_full_params(module, writeback=False):
        yield
