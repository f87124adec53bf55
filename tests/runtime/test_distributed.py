"""Distributed snapshots: the cost-balanced plan, and gloo runs of 2-4 CPU processes (DDP, FSDP2, FSDP1,
a failing rank) whose gathered snapshot equals the single-process one bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from spectral_plugins import Snapshot, SpectralEngine, SpectralTracker, map_model
from spectral_plugins.runtime.distributed import (
    DistributedAnalyzer,
    _materialise,
    assign_ranks,
    distributed_analyze,
    failed_layer,
    matrix_cost,
    plan,
)
from tests.multiprocess import run_ranks

TIMEOUT = 120.0  # whole multi-process run; a hang fails the test instead of blocking CI


class Net(nn.Module):
    """Two torch transformer layers (fused in_proj_weight split into q/k/v) between an embedding and
    a head, and a 2-row matrix: units of one and of three matrices, several shapes, rows that do not
    split evenly over 3 ranks (45, 50) and a shard that is empty (2 rows on 3 ranks)."""

    def __init__(self, d: int = 30, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d, nhead=3, dim_feedforward=45,
                                                                batch_first=True, dropout=0.0)
                                     for _ in range(layers)])
        self.lm_head = nn.Linear(d, 50, bias=False)
        self.tiny = nn.Parameter(torch.randn(2, d))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + 0.01 * self.tiny.sum(0)
        for layer in self.layers:
            x = layer(x)
        return nn.functional.cross_entropy(self.lm_head(x).flatten(0, 1), idx.flatten())


def same(a: Snapshot, b: Snapshot) -> bool:
    return dataclasses.replace(a, seconds=0.0).to_json() == dataclasses.replace(b, seconds=0.0).to_json()


def first_difference(a: Snapshot, b: Snapshot) -> str:
    """Where two snapshots differ (for assertion messages)."""
    for x, y in zip(a.layers, b.layers):
        for field in dataclasses.fields(x):
            if repr(getattr(x, field.name)) != repr(getattr(y, field.name)):
                return f"{x.name}.{field.name}: {getattr(x, field.name)!r} != {getattr(y, field.name)!r}"
    header = ("step", "method", "dtype", "device")
    fields = "; ".join(f"{h}: {getattr(a, h)!r} vs {getattr(b, h)!r}" for h in header)
    return f"{fields}; {len(a)} vs {len(b)} layers"


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def train(model: nn.Module, steps: int, rank: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(steps):
        loss = model(torch.randint(0, 50, (2, 8), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ---------------------------------------------------------------------- single process
def test_assignment_is_deterministic_and_balanced():
    costs = [matrix_cost(s) for s in [(768, 3072), (3072, 768), (768, 768)] * 8 + [(50257, 768)]]
    owners = assign_ranks(costs, 4)
    assert owners == assign_ranks(list(costs), 4)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(4)]
    assert max(loads) <= max(costs) + sum(costs) / 4  # the LPT bound
    assert assign_ranks([5.0, 5.0, 5.0], 2) == [0, 1, 0]  # ties: lowest index to the lowest rank
    assert assign_ranks([1.0], 3) == [0]
    with pytest.raises(ValueError):
        assign_ranks(costs, 0)


def test_cost_counts_gram_product_and_eigensolver():
    assert matrix_cost((10, 40)) == 10 * 40 * 10 + 10**3 == matrix_cost((40, 10))


def test_plan_keeps_each_parameter_on_one_rank():
    model_map = map_model(net())
    units = plan(model_map, 3)
    assert sum(len(u.refs) for u in units) == len(model_map)
    fused = [u for u in units if len(u.refs) == 3]
    assert len(fused) == 2 and {r.role for r in fused[0].refs} == {"q", "k", "v"}
    assert {u.owner for u in units} == {0, 1, 2}


def test_without_a_process_group_it_is_the_engine():
    model = net()
    engine = SpectralEngine()
    assert same(distributed_analyze(engine, map_model(model), step=3), engine.analyze(model, step=3))
    assert same(DistributedAnalyzer(engine).analyze(model, step=3), engine.analyze(model, step=3))


def test_failed_layer_is_nan_and_not_finite():
    ref = map_model(net()).matrices[0]
    layer = failed_layer(ref)
    assert not layer.finite and layer.alpha != layer.alpha and layer.name == ref.name


# ---------------------------------------------------------------------- gloo processes
class FailingEngine(SpectralEngine):
    def __init__(self, failing_ranks: set[int]) -> None:
        super().__init__()
        self.failing_ranks = failing_ranks

    def analyze(self, model_or_map, step=None, progress=None):
        if dist.is_initialized() and dist.get_rank() in self.failing_ranks:
            raise RuntimeError(f"injected failure on rank {dist.get_rank()}")
        return super().analyze(model_or_map, step=step, progress=progress)


def scenario_replicated(rank: int, world: int) -> dict[str, Any]:
    model = net()
    snapshot = distributed_analyze(SpectralEngine(), map_model(model), step=4)
    reference = SpectralEngine().analyze(map_model(model), step=4)
    return {"snapshot": snapshot, "reference": reference}


def scenario_ddp(rank: int, world: int) -> dict[str, Any]:
    model = nn.parallel.DistributedDataParallel(net())
    train(model, 2, rank)
    snapshot = distributed_analyze(SpectralEngine(), model, step=2)  # the DDP wrapper itself
    reference = SpectralEngine().analyze(map_model(model.module), step=2)
    return {"snapshot": snapshot, "reference": reference}


def scenario_fsdp2(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = net()
    unsharded = copy.deepcopy(model)
    before = SpectralEngine().analyze(map_model(unsharded), step=0)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model_map = map_model(model)
    tiny_rows = [None] * world
    dist.all_gather_object(tiny_rows, model.tiny.to_local().shape[0])
    analyzer = DistributedAnalyzer(SpectralEngine())
    at_start = analyzer.analyze(model_map, step=0)
    # Only the owner of a unit holds its full matrix, and it is the gathered full tensor.
    units = plan(model_map, world)
    full, bad = _materialise(units, rank, None)
    held = sorted(full)
    gathered = [unit.source.full_tensor() for unit in units]  # a collective: every rank, every unit
    exact = all(torch.equal(full[i], gathered[i]) for i in held) and bad == ()
    train(model, 2, rank)
    after = analyzer.analyze(model_map, step=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            unsharded.get_parameter(name).copy_(param.full_tensor())
    reference_after = SpectralEngine().analyze(map_model(unsharded), step=2)
    return {"snapshot": at_start, "reference": before, "snapshot_after": after,
            "reference_after": reference_after, "held": held,
            "owned": [i for i, u in enumerate(units) if u.owner == rank], "exact": exact,
            "sharded": type(model.lm_head.weight).__name__, "tiny_rows": tiny_rows}


def scenario_fsdp1(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = net()
    reference = SpectralEngine().analyze(map_model(model), step=0)
    wrapped = FSDP(model, device_id=torch.device("cpu"))
    snapshot = distributed_analyze(SpectralEngine(), wrapped, step=0)
    return {"snapshot": snapshot, "reference": reference}


def scenario_failure(rank: int, world: int) -> dict[str, Any]:
    model = net()
    engine = FailingEngine({1})
    analyzer = DistributedAnalyzer(engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = analyzer.analyze(map_model(model), step=1)
        engine.failing_ranks = {0}  # the destination's own share fails next
        second = analyzer.analyze(map_model(model), step=2)
        engine.failing_ranks = set()
        third = analyzer.analyze(map_model(model), step=3)
    owners = {ref.name: unit.owner for unit in plan(map_model(model), world) for ref in unit.refs}
    return {"first": first, "second": second, "third": third, "owners": owners,
            "reference": SpectralEngine().analyze(map_model(model), step=1),
            "warnings": [str(w.message) for w in caught if "spectral share" in str(w.message)],
            "failures": analyzer.failures}


def scenario_shard_failure(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = net()
    reference = SpectralEngine().analyze(map_model(model), step=1)
    fully_shard(model)
    from torch.distributed.tensor import DTensor

    target = model.lm_head.weight.to_local().data_ptr()
    original = DTensor.to_local

    def to_local(self, *args, **kwargs):  # rank 2 cannot produce its shard of lm_head
        local = original(self, *args, **kwargs)
        if local.data_ptr() == target:  # detached views share the parameter's storage
            raise RuntimeError("injected: no local shard")
        return local

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if rank == 2:
                DTensor.to_local = to_local
            snapshot = distributed_analyze(SpectralEngine(), map_model(model), step=1)
        finally:
            DTensor.to_local = original
    return {"snapshot": snapshot, "reference": reference,
            "warnings": [str(w.message) for w in caught if "spectral share" in str(w.message)]}


def _tracked_ddp_run(rank: int, background: bool) -> dict[str, Any]:
    """A DDP training loop with a SpectralTracker on every rank (each with a recording publisher),
    snapshots every 2 steps over 7 steps; rank 0 also takes single-process reference snapshots of
    the live weights at the due steps."""
    from tests.publishers import RecordingPublisher

    model = nn.parallel.DistributedDataParallel(net())
    recording = RecordingPublisher()
    tracker = SpectralTracker(model.module, every_n_steps=2, publishers=[recording], background=background,
                              heatmap=False, fast_every_n_steps=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)
    references = {0: SpectralEngine().analyze(map_model(model.module), step=0)}
    exact_stable_ranks = {}  # float64 SVD of the (replicated) weights at every step
    tracker.step(0)
    for step in range(1, 8):
        loss = model(torch.randint(0, 50, (2, 8), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 2 == 0 or step == 7:
            references[step] = SpectralEngine().analyze(map_model(model.module), step=step)
        singular = {ref.key: torch.linalg.svdvals(ref.weight().double()) for ref in tracker.model_map}
        exact_stable_ranks[step] = {k: float(s.square().sum() / s[0] ** 2) for k, s in singular.items()}
        tracker.step(step)
    summary = tracker.finish()
    reports = recording.reports
    assert tracker.fast is not None and tracker.fast.lane is not None
    return {"steps": [r.step for r in reports], "snapshots": [r.snapshot for r in reports],
            "references": references, "summary": summary is not None, "summaries": len(recording.summaries),
            "configs": recording.configs, "last_step": tracker.last_step, "closed": recording.closed,
            "fast": [(r.step, {layer.key: layer.stable_rank for layer in r.snapshot})
                     for r in recording.fast_reports],
            "exact_stable_ranks": exact_stable_ranks, "fast_failed": tracker.fast.failed,
            "share": [ref.key for ref in tracker.fast.lane.model_map]}


def scenario_tracker_ddp(rank: int, world: int) -> dict[str, Any]:
    return _tracked_ddp_run(rank, background=False)


def scenario_tracker_ddp_background(rank: int, world: int) -> dict[str, Any]:
    return _tracked_ddp_run(rank, background=True)


def scenario_tracker_fsdp2_background(rank: int, world: int) -> dict[str, Any]:
    """background=True on sharded weights: a warning, then synchronous shares (exact)."""
    from torch.distributed.fsdp import fully_shard

    model = net()
    reference = SpectralEngine().analyze(map_model(copy.deepcopy(model)), step=2)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = SpectralTracker(model, every_n_steps=2, background=True, heatmap=False, history=False)
    report = tracker.step(2)
    tracker.close()
    return {"snapshot": report.snapshot if report else None, "reference": reference,
            "background": tracker.snapshotter is not None,
            # the model map's notice about the matrix of role 'other' ("tiny") is not the point here
            "warnings": [str(w.message) for w in caught if "spectral-plugins" in str(w.message)
                         and "no recognised role" not in str(w.message)]}


SCENARIOS = {f.__name__.removeprefix("scenario_"): f for f in
             (scenario_replicated, scenario_ddp, scenario_fsdp2, scenario_fsdp1, scenario_failure,
              scenario_shard_failure, scenario_tracker_ddp, scenario_tracker_ddp_background,
              scenario_tracker_fsdp2_background)}
# Scenarios sharing a world size run in one launch, to pay the processes' start-up (importing torch) once.
LAUNCHES = {2: ("replicated", "ddp", "fsdp1"),
            3: ("fsdp2", "failure", "shard_failure", "tracker_ddp", "tracker_ddp_background",
                "tracker_fsdp2_background"),
            4: ("replicated",)}


def _worker(rank: int, world: int, scenarios: tuple[str, ...], folder: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(FSDP|fully_shard|TypedStorage|nested tensors).*")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT))
    try:
        results = {}
        for scenario in scenarios:
            try:
                results[scenario] = SCENARIOS[scenario](rank, world)
            except Exception:  # reported by the test of that scenario; the others still run
                results[scenario] = {"error": traceback.format_exc()}
        with open(Path(folder) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
        # Tear down together: a rank that destroys its gloo group while a peer still uses the
        # connection can abort that peer (SIGABRT, exit code -6).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(scenarios: tuple[str, ...], world: int, folder: Path) -> list[dict[str, Any]]:
    """Run ``scenarios`` on ``world`` gloo processes; fail (and kill them) if they outlive TIMEOUT.
    Returns, per rank, ``{scenario: result}``."""
    run_ranks(_worker, world, (world, scenarios, str(folder)), TIMEOUT)
    results = []
    for rank in range(world):
        with open(folder / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """``gloo(scenario, world)``: the per-rank results of a scenario (each launch runs once)."""
    launched: dict[int, list[dict[str, Any]]] = {}

    def results(scenario: str, world: int) -> list[dict[str, Any]]:
        if world not in launched:
            launched[world] = launch(LAUNCHES[world], world, tmp_path_factory.mktemp(f"gloo{world}"))
        per_rank = [r[scenario] for r in launched[world]]
        errors = [r["error"] for r in per_rank if "error" in r]
        assert not errors, errors[0]
        return per_rank

    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gathered_snapshot_equals_single_process_exactly(gloo, world):
    results = gloo("replicated", world)
    assert same(results[0]["snapshot"], results[0]["reference"])
    assert all(r["snapshot"] is None for r in results[1:])


@pytest.mark.slow
def test_ddp_model(gloo):
    results = gloo("ddp", 2)
    assert same(results[0]["snapshot"], results[0]["reference"])
    assert results[1]["snapshot"] is None


@pytest.mark.slow
def test_fsdp2_gathers_only_owned_matrices_and_matches_exactly(gloo):
    results = gloo("fsdp2", 3)
    first = results[0]
    assert first["sharded"] == "DTensor" and first["tiny_rows"] == [1, 1, 0]
    assert same(first["snapshot"], first["reference"])
    assert same(first["snapshot_after"], first["reference_after"])
    for result in results:
        assert result["held"] == result["owned"] and result["exact"]
    assert results[1]["snapshot"] is None and results[2]["snapshot_after"] is None


@pytest.mark.slow
def test_fsdp1_model(gloo):
    results = gloo("fsdp1", 2)
    assert same(results[0]["snapshot"], results[0]["reference"])


@pytest.mark.slow
def test_a_failing_rank_does_not_hang_the_others(gloo):
    results = gloo("failure", 3)
    result = results[0]
    reference = result["reference"]
    for snapshot, failing in ((result["first"], 1), (result["second"], 0)):
        for layer, expected in zip(snapshot.layers, reference.layers):
            if result["owners"][layer.name] == failing:
                assert not layer.finite and layer.alpha != layer.alpha and layer.name == expected.name
            else:
                assert repr(layer) == repr(expected)  # NaN-safe, exact (repr round-trips)
    assert same(result["third"], dataclasses.replace(reference, step=3))
    assert len(result["warnings"]) == 1 and "rank(s) [1]" in result["warnings"][0]
    assert result["failures"] == 2
    assert all(r["first"] is None and r["warnings"] == [] for r in results[1:])


@pytest.mark.slow
def test_a_rank_that_cannot_send_its_shard_marks_that_matrix_failed(gloo):
    result = gloo("shard_failure", 3)[0]
    for layer, expected in zip(result["snapshot"].layers, result["reference"].layers):
        if layer.name == "lm_head.weight":
            assert not layer.finite and layer.alpha != layer.alpha
        else:
            assert repr(layer) == repr(expected)
    assert len(result["warnings"]) == 1 and "rank(s) [2]" in result["warnings"][0]
    assert "could not send its shard of 1 matrices" in result["warnings"][0]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["tracker_ddp", "tracker_ddp_background"])
def test_tracker_shares_work_and_rank_zero_publishes_exact_snapshots(gloo, scenario):
    results = gloo(scenario, 3)
    main = results[0]
    # synchronous: every due step at once; background: the same steps, each published a period later
    assert main["steps"] == [0, 2, 4, 6, 7]
    for snapshot, step in zip(main["snapshots"], main["steps"]):
        reference = main["references"][step]
        assert snapshot.step == step and same(snapshot, reference), first_difference(snapshot, reference)
    assert main["summary"] and main["summaries"] == 1 and main["configs"][0]["ranks"] == 3
    for other in results[1:]:  # the same steps were computed there, nothing was published
        assert other["steps"] == [] and other["summaries"] == 0 and not other["summary"]
        assert other["last_step"] == 7 and other["fast"] == []
    assert all(r["closed"] == 1 for r in results)
    # the fast lane: each rank measured its own share, rank 0 published every matrix at every
    # step between full snapshots, each within 1e-3 of a float64 SVD of the weights at that step
    shares = [r["share"] for r in results]
    everything = [layer.key for layer in main["snapshots"][0]]
    assert sorted(sum(shares, [])) == sorted(everything) and all(shares)
    assert [step for step, _ in main["fast"]] == [1, 3, 5, 7] and main["fast_failed"] == 0
    for step, stable_ranks in main["fast"]:
        assert set(stable_ranks) == set(everything)
        for key, value in stable_ranks.items():
            exact = main["exact_stable_ranks"][step][key]
            assert abs(value - exact) <= 1e-3 * exact, (step, key, value, exact)


@pytest.mark.slow
def test_background_on_sharded_weights_falls_back_to_synchronous_shares(gloo):
    results = gloo("tracker_fsdp2_background", 3)
    assert not results[0]["background"] and same(results[0]["snapshot"], results[0]["reference"])
    for result in results:  # one for background, one for the fast lane, both naming the sharding
        background = [w for w in result["warnings"] if "fast lane" not in w]
        fast = [w for w in result["warnings"] if "fast lane" in w]
        assert len(background) == 1 and "sharded" in background[0]
        assert len(fast) == 1 and "sharded" in fast[0]
    assert results[1]["snapshot"] is None
