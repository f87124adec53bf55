"""Background snapshots: the same metrics as the synchronous path, the weights of exactly step s,
never more than one in flight."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings

import pytest
import torch

from spectral_plugins import Snapshot, SpectralEngine, map_model
from spectral_plugins.demo.model import CharGPT, GPTConfig
from spectral_plugins.runtime.background import BackgroundSnapshotter, unique_sources
from tests.conftest import tiny_gpt2

TIMEOUT = 60.0
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def same(a: Snapshot, b: Snapshot) -> bool:
    """Equal step and every metric bit for bit (JSON floats round-trip exactly; NaN written as null)."""
    return dataclasses.replace(a, seconds=0.0).to_json() == dataclasses.replace(b, seconds=0.0).to_json()


def small_gpt() -> CharGPT:
    return CharGPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32))


def train_step(model: CharGPT, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    idx = torch.randint(0, 40, (4, 17), generator=generator).to(model.lm_head.weight.device)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


class GatedEngine(SpectralEngine):
    """An engine that waits for a gate before computing, to hold a snapshot in flight."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.gate = threading.Event()
        self.started = threading.Event()

    def analyze(self, model_or_map, step=None, progress=None):
        self.started.set()
        assert self.gate.wait(TIMEOUT), "test gate never opened"
        return super().analyze(model_or_map, step=step, progress=progress)


class FailingEngine(SpectralEngine):
    def analyze(self, model_or_map, step=None, progress=None):
        raise RuntimeError("boom")


@pytest.mark.parametrize("device", DEVICES)
def test_background_and_synchronous_modes_give_identical_metrics(device):
    model = tiny_gpt2().to(device)  # fused c_attn split into q/k/v views, tied lm_head, transposed Conv1D
    model_map = map_model(model)
    engine = SpectralEngine()
    with BackgroundSnapshotter(engine, model_map) as background, \
            BackgroundSnapshotter(engine, model_map, synchronous=True) as synchronous:
        assert background.submit(7) and synchronous.submit(7)
        (from_copy,) = background.drain(TIMEOUT)
        (inline,) = synchronous.poll()
    assert from_copy.step == inline.step == 7
    assert same(from_copy, inline)
    assert same(from_copy, engine.analyze(model_map, step=7))
    assert [layer.name for layer in from_copy] == [ref.name for ref in model_map]


@pytest.mark.parametrize("device, buffer_device", [("cpu", None), pytest.param("cuda", None, marks=CUDA),
                                                  pytest.param("cuda", "cpu", marks=CUDA)])
def test_copied_weights_are_those_after_optimizer_step_s_not_a_later_mix(device, buffer_device):
    model = small_gpt().to(device)
    model_map = map_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    engine = GatedEngine(device=device)  # pinned host buffers, computed on the GPU like the reference
    snapshotter = BackgroundSnapshotter(engine, model_map, buffer_device=buffer_device)
    for _ in range(3):
        train_step(model, optimizer, generator)
    reference = SpectralEngine(device=device).analyze(model_map, step=3)  # live weights after step 3
    assert snapshotter.submit(3)
    assert all(b.device.type == (buffer_device or device) for b in snapshotter._buffers)
    assert all(b.is_pinned() for b in snapshotter._buffers) == (buffer_device == "cpu")
    assert engine.started.wait(TIMEOUT)
    for _ in range(5):  # training goes on while the snapshot of step 3 is held in flight
        train_step(model, optimizer, generator)
    assert snapshotter.poll() == []
    engine.gate.set()
    (snapshot,) = snapshotter.close(TIMEOUT)
    assert snapshot.step == 3
    assert same(snapshot, reference)
    assert not same(SpectralEngine(device=device).analyze(model_map, step=3), reference)  # weights moved on


def test_one_snapshot_in_flight_later_submits_are_skipped_and_counted():
    model = small_gpt()
    engine = GatedEngine()
    snapshotter = BackgroundSnapshotter(engine, map_model(model))
    assert snapshotter.pending_step is None
    assert snapshotter.submit(25)
    assert snapshotter.busy and snapshotter.pending_step == 25
    assert not snapshotter.submit(50)
    assert not snapshotter.submit(75)
    assert snapshotter.skipped == 2
    engine.gate.set()
    assert [s.step for s in snapshotter.drain(TIMEOUT)] == [25]
    assert snapshotter.submit(100)
    assert [s.step for s in snapshotter.drain(TIMEOUT)] == [100]
    stats = snapshotter.stats
    assert (stats.submitted, stats.completed, stats.skipped, stats.failed) == (2, 2, 2, 0)
    assert stats.compute_seconds > 0 and stats.copy_seconds > 0
    snapshotter.close()
    with pytest.raises(RuntimeError, match="after close"):
        snapshotter.submit(125)


def wait_until_idle(snapshotter: BackgroundSnapshotter) -> None:
    """Wait for the computation in flight without collecting its result."""
    deadline = time.monotonic() + TIMEOUT
    while snapshotter.busy:
        assert time.monotonic() < deadline, "background snapshot did not finish"
        time.sleep(0.01)


def test_finished_snapshots_keep_their_own_steps_in_order():
    model = small_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    model_map = map_model(model)
    snapshotter = BackgroundSnapshotter(SpectralEngine(), model_map)
    references = {}
    for step in range(1, 4):
        train_step(model, optimizer, generator)
        references[step] = SpectralEngine().analyze(model_map, step=step)
        wait_until_idle(snapshotter)  # a submit while one is in flight is a skip, tested elsewhere
        assert snapshotter.submit(step)
        snapshotter.drain(TIMEOUT) if step == 2 else None  # one drained early, the others polled at close
    results = snapshotter.close(TIMEOUT)
    assert [s.step for s in results] == [3]  # step 1 and 2 were handed out by the drain
    assert same(results[0], references[3])


def test_a_failing_computation_warns_once_and_never_raises():
    snapshotter = BackgroundSnapshotter(FailingEngine(), map_model(small_gpt()))
    with pytest.warns(RuntimeWarning, match="failed.*RuntimeError: boom"):
        assert snapshotter.submit(1)
        assert snapshotter.drain(TIMEOUT) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure is only counted
        assert snapshotter.submit(2)
        assert snapshotter.drain(TIMEOUT) == []
    assert snapshotter.stats.failed == 2 and isinstance(snapshotter.last_error, RuntimeError)
    snapshotter.close()


def test_synchronous_failure_is_counted_like_a_background_one():
    snapshotter = BackgroundSnapshotter(FailingEngine(), map_model(small_gpt()), synchronous=True)
    with pytest.warns(RuntimeWarning, match="boom"):
        assert snapshotter.submit(1)
    assert snapshotter.poll() == [] and snapshotter.stats.failed == 1


def test_buffers_are_reused_and_reallocated_only_when_a_parameter_changes():
    model = small_gpt()
    model_map = map_model(model)
    snapshotter = BackgroundSnapshotter(SpectralEngine(), model_map)
    snapshotter.submit(1)
    snapshotter.drain(TIMEOUT)
    first = [b.data_ptr() for b in snapshotter._buffers]
    snapshotter.submit(2)
    snapshotter.drain(TIMEOUT)
    assert [b.data_ptr() for b in snapshotter._buffers] == first
    model.double()  # every parameter changes dtype in place: new buffers, still exact
    snapshotter.submit(3)
    (snapshot,) = snapshotter.drain(TIMEOUT)
    assert all(b.dtype == torch.float64 for b in snapshotter._buffers)
    assert same(snapshot, SpectralEngine().analyze(model_map, step=3))
    snapshotter.close()


def test_shared_sources_are_copied_once_and_rebound_views_match():
    model = tiny_gpt2()
    model_map = map_model(model)
    sources, index = unique_sources(model_map)
    assert len(sources) < len(model_map)  # q/k/v of each c_attn share one source
    for ref, i in zip(model_map, index):
        assert ref.source is sources[i]
        copy = sources[i].detach().clone()
        assert torch.equal(ref.with_source(copy).weight(), ref.weight())
    with pytest.raises(ValueError, match="cannot view"):
        model_map.matrices[0].with_source(torch.zeros(3, 3))


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="needs os.setpriority (Linux)")
def test_nice_lowers_only_the_worker_threads_priority():
    seen = {}

    class Recording(SpectralEngine):
        def analyze(self, model_or_map, step=None, progress=None):
            seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return super().analyze(model_or_map, step=step, progress=progress)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with BackgroundSnapshotter(Recording(), map_model(small_gpt()), nice=5) as snapshotter:
        snapshotter.submit(1)
        assert [s.step for s in snapshotter.drain(TIMEOUT)] == [1]
    assert seen["worker"] == min(19, before + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
