"""Snapshots off the training path: copy the weights at a step boundary, compute spectra on a worker.

::

    snapshotter = BackgroundSnapshotter(SpectralEngine(), map_model(model))
    for step in range(1, num_steps + 1):
        ...  # forward, backward, optimizer.step()
        if step % 25 == 0:
            snapshotter.submit(step)         # copies the weights after optimizer step ``step``
        for snapshot in snapshotter.poll():  # finished snapshots, each tagged with its own step
            publish(snapshot)
    for snapshot in snapshotter.close():     # waits for the last one
        publish(snapshot)

What :meth:`BackgroundSnapshotter.submit` costs the training thread:

- CPU weights: one ``copy_`` of every analysed parameter into buffers allocated once and reused;
- CUDA weights: the copies are *queued* on a side stream that first waits for the training stream
  (so it reads the weights after the optimizer step) and records an event; the training stream then
  waits for that event, so the next optimizer step cannot overwrite a weight before it is copied.
  Nothing blocks the host. The worker's compute stream waits for the same event before reading the
  buffers (device buffers), or the worker waits for it on the host (pinned host buffers,
  ``buffer_device="cpu"``, for when a second copy of the weights does not fit on the GPU).

The spectra are computed from the copies by the engine's own code path (a model map whose matrices
view the buffers exactly as the live map views the parameters), so the metrics are identical to
``engine.analyze(model_map, step)`` at that step. At most one snapshot is in flight: a submit while
one is running is skipped and counted (:attr:`SnapshotterStats.skipped`), never queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from ..core.engine import SpectralEngine
from ..core.model_map import ModelMap
from ..core.options import positive_int
from ..core.snapshot import Snapshot

log = logging.getLogger("spectral_plugins")


@dataclass(frozen=True)
class SnapshotterStats:
    """Counters of a :class:`BackgroundSnapshotter`.

    Attributes:
        submitted: snapshots started (copied, or computed inline when synchronous).
        completed: snapshots finished and handed out (or waiting in :meth:`~BackgroundSnapshotter.poll`).
        skipped: submits refused because a snapshot was still in flight.
        failed: snapshots whose copy or computation raised (each warned about, never re-raised).
        copy_seconds: total seconds :meth:`~BackgroundSnapshotter.submit` spent on the calling thread
            (the training loop's cost; for CUDA weights only the time to queue the copies).
        compute_seconds: total seconds of spectral computation (on the worker unless synchronous).
    """

    submitted: int = 0
    completed: int = 0
    skipped: int = 0
    failed: int = 0
    copy_seconds: float = 0.0
    compute_seconds: float = 0.0


def unique_sources(model_map: ModelMap) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct source tensors of a map (a fused q/k/v or tied matrix is one source), in map order,
    and for each matrix the index of its source."""
    sources: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    index: list[int] = []
    for ref in model_map.matrices:
        tensor = ref.source
        if id(tensor) not in seen:
            seen[id(tensor)] = len(sources)
            sources.append(tensor)
        index.append(seen[id(tensor)])
    return sources, index


class BackgroundSnapshotter:
    """Takes :class:`Snapshot` s of a model map at step boundaries and computes them off the training path.

    Args:
        engine: computes the spectra (its settings decide method, dtype and compute device).
        model_map: the matrices to analyse; its references must view the live parameters.
        synchronous: compute inline in :meth:`submit` from the live weights (no copy, no thread), for
            exactness tests and debugging; :meth:`poll` then returns the result at once.
        buffer_device: where the copies live: None (default) next to each weight; "cpu" for pinned
            host buffers (CUDA weights), so a second copy of the weights costs no GPU memory. The
            engine computes where the copies are unless it has a ``device`` of its own (with
            ``SpectralEngine(device="cuda")`` it streams each batch back to the GPU, and the metrics
            equal those of the live GPU weights; without, they are the CPU engine's float64 ones).
        pin_memory: pin host buffers that receive CUDA weights (needed for asynchronous copies).
        nice: on Linux, raise the worker thread's nice value by this much (its OpenMP threads inherit
            it), so on a busy CPU the training threads get priority; 0 leaves it unchanged.
        threads: torch CPU threads of the worker thread. A new thread does not inherit
            ``torch.set_num_threads`` (OpenMP keeps the setting per thread), so by default (None) the
            worker takes the count of the thread that first submits, and computes exactly what a
            synchronous snapshot there would (the thread count changes the last bits of BLAS results).

    The buffers are allocated on the first :meth:`submit` (and again only if a parameter changes
    shape, dtype or device) and cost one copy of the analysed weights.
    """

    def __init__(
        self,
        engine: SpectralEngine,
        model_map: ModelMap,
        synchronous: bool = False,
        buffer_device: str | torch.device | None = None,
        pin_memory: bool = True,
        nice: int = 0,
        threads: int | None = None,
    ) -> None:
        positive_int("threads", threads, optional=True)
        self.engine = engine
        self.threads = threads
        self.model_map = model_map
        self.synchronous = synchronous
        self.buffer_device = torch.device(buffer_device) if buffer_device is not None else None
        self.pin_memory = pin_memory
        self.nice = nice
        self._sources, self._index = unique_sources(model_map)
        self._buffers: list[torch.Tensor] = []
        self._shadow: ModelMap | None = None
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._compute_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[Snapshot] | None = None
        self._future_step: int | None = None
        self._ready: list[Snapshot] = []
        self._stats = SnapshotterStats()
        self._lock = threading.Lock()
        self._closed = False
        self.last_error: BaseException | None = None

    # ------------------------------------------------------------------ public API
    @property
    def stats(self) -> SnapshotterStats:
        """The counters so far (a frozen copy)."""
        return self._stats

    @property
    def skipped(self) -> int:
        """Submits refused because a snapshot was in flight."""
        return self._stats.skipped

    @property
    def busy(self) -> bool:
        """Whether a snapshot is being computed now."""
        return self._future is not None and not self._future.done()

    @property
    def pending_step(self) -> int | None:
        """The step of the snapshot in flight, or None."""
        return self._future_step if self.busy else None

    def submit(self, step: int) -> bool:
        """Start a snapshot of the weights as they are now, tagged ``step``. Call it at a step
        boundary (after ``optimizer.step()``). Returns False, counting a skip, when a snapshot is
        still in flight, and False (with a warning) when the copy failed; True otherwise."""
        if self._closed:
            raise RuntimeError("BackgroundSnapshotter.submit after close()")
        step = int(step)
        if self.synchronous:
            self._count(submitted=1)
            self._run(step)
            return True
        if self.busy:
            self._count(skipped=1)
            return False
        self._collect()  # a finished future is moved to the ready list before it is replaced
        started = time.perf_counter()
        try:
            shadow, events = self._copy()
        except Exception as error:  # noqa: BLE001 - a failed copy must not reach the training loop
            self._fail(step, error)
            return False
        self._count(submitted=1, copy_seconds=time.perf_counter() - started)
        if self._executor is None:
            threads = self.threads or torch.get_num_threads()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectral-snapshot",
                                                initializer=self._init_worker, initargs=(threads,))
        self._future = self._executor.submit(self._compute, shadow, step, events)
        self._future_step = step
        return True

    def poll(self) -> list[Snapshot]:
        """The snapshots finished since the last call (oldest first), without waiting."""
        self._collect()
        ready, self._ready = self._ready, []
        return ready

    def drain(self, timeout: float | None = None) -> list[Snapshot]:
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the snapshot in flight, then
        return every finished snapshot, like :meth:`poll`."""
        future = self._future
        if future is not None:
            with contextlib.suppress(FutureTimeout):
                future.exception(timeout=timeout)  # waits; an error is reported by _collect
        return self.poll()

    def close(self, timeout: float | None = None) -> list[Snapshot]:
        """Wait for the snapshot in flight (up to ``timeout``), stop the worker, free the buffers and
        return the snapshots not yet polled. Further submits raise."""
        if self._closed:
            return self.poll()
        ready = self.drain(timeout)
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=not self.busy, cancel_futures=True)
            self._executor = None
        self._buffers, self._shadow = [], None
        return ready

    def __enter__(self) -> BackgroundSnapshotter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ copying
    def _buffer_device(self, source: torch.Tensor) -> torch.device:
        return self.buffer_device if self.buffer_device is not None else source.device

    def _ensure_buffers(self) -> ModelMap:
        """(Re)allocate the buffers if missing or if a source changed shape, dtype or device; the map
        viewing them."""
        stale = len(self._buffers) != len(self._sources) or any(
            b.shape != s.shape or b.dtype != s.dtype or b.device != self._buffer_device(s)
            for b, s in zip(self._buffers, self._sources))
        if not stale and self._shadow is not None:
            return self._shadow
        buffers = []
        for source in self._sources:
            device = self._buffer_device(source)
            pin = self.pin_memory and device.type == "cpu" and source.device.type == "cuda"
            buffers.append(torch.empty(source.shape, dtype=source.dtype, device=device, pin_memory=pin))
        self._buffers = buffers
        refs = tuple(ref.with_source(buffers[i]) for ref, i in zip(self.model_map.matrices, self._index))
        self._shadow = dataclasses.replace(self.model_map, matrices=refs)
        return self._shadow

    def _copy(self) -> tuple[ModelMap, tuple[torch.cuda.Event, ...]]:
        """Copy every source into its buffer; CUDA sources on a side stream per device, the others
        inline. Returns the map viewing the buffers and the events the computation must wait for."""
        shadow = self._ensure_buffers()
        cuda_pairs: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        with torch.no_grad():
            for source, buffer in zip(self._sources, self._buffers):
                if source.device.type == "cuda":
                    cuda_pairs.setdefault(source.device, []).append((source, buffer))
                else:
                    buffer.copy_(source.detach())
        events = []
        for device, pairs in cuda_pairs.items():
            training = torch.cuda.current_stream(device)
            stream = self._copy_streams.get(device)
            if stream is None:
                stream = self._copy_streams[device] = torch.cuda.Stream(device)
            stream.wait_stream(training)  # read the weights as the optimizer step left them
            with torch.cuda.stream(stream), torch.no_grad():
                for source, buffer in pairs:
                    buffer.copy_(source.detach(), non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            training.wait_event(event)  # the next update waits for the copy, the host does not
            events.append(event)
        return shadow, tuple(events)

    # ------------------------------------------------------------------ computing
    def _init_worker(self, threads: int) -> None:
        torch.set_num_threads(threads)
        if self.nice and hasattr(os, "setpriority"):
            try:
                thread = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + self.nice)
            except OSError:  # not permitted here: run at normal priority
                log.debug("could not renice the snapshot worker", exc_info=True)

    def _compute(self, shadow: ModelMap, step: int, events: Sequence[torch.cuda.Event]) -> Snapshot:
        with self._compute_streams_waiting_for(events):
            started = time.perf_counter()
            snapshot = self.engine.analyze(shadow, step=step)
            self._count(compute_seconds=time.perf_counter() - started)
            for stream in self._compute_streams.values():
                stream.synchronize()  # nothing may still read the buffers once we report done
        return snapshot

    @contextlib.contextmanager
    def _compute_streams_waiting_for(self, events: Sequence[torch.cuda.Event]) -> Iterator[None]:
        """On the worker thread: make a private stream current on every CUDA device the engine will
        use, each waiting for the copy events; host buffers wait for their copies on the host."""
        engine_device = self.engine.device
        devices = {engine_device} if engine_device is not None else {b.device for b in self._buffers}
        cuda_devices = sorted((d for d in devices if d.type == "cuda"), key=str)
        if any(d.type != "cuda" for d in devices):
            for event in events:
                event.synchronize()  # computing on the host from pinned buffers: the copy must have landed
        with contextlib.ExitStack() as stack:
            for device in cuda_devices:
                stream = self._compute_streams.get(device)
                if stream is None:
                    stream = self._compute_streams[device] = torch.cuda.Stream(device)
                for event in events:
                    stream.wait_event(event)
                stack.enter_context(torch.cuda.stream(stream))
            yield

    def _run(self, step: int) -> None:
        """Synchronous mode: analyse the live weights inline."""
        started = time.perf_counter()
        try:
            snapshot = self.engine.analyze(self.model_map, step=step)
        except Exception as error:  # noqa: BLE001 - never into the training loop
            self._fail(step, error)
            return
        self._count(completed=1, compute_seconds=time.perf_counter() - started)
        self._ready.append(snapshot)

    def _collect(self) -> None:
        future = self._future
        if future is None or not future.done():
            return
        self._future, step = None, self._future_step
        error = future.exception()
        if error is not None:
            self._fail(step, error)
        else:
            self._count(completed=1)
            self._ready.append(future.result())

    # ------------------------------------------------------------------ bookkeeping
    def _count(self, **increments: float) -> None:
        with self._lock:  # the worker adds compute time while the training thread counts submits
            values = {k: getattr(self._stats, k) + v for k, v in increments.items()}
            self._stats = dataclasses.replace(self._stats, **values)

    def _fail(self, step: int | None, error: BaseException) -> None:
        first = self._stats.failed == 0
        self._count(failed=1)
        self.last_error = error
        log.debug("spectral snapshot at step %s failed", step, exc_info=error)
        if first:
            warnings.warn(f"spectral-plugins: the snapshot at step {step} failed ({type(error).__name__}: "
                          f"{error}); training continues, later failures are only counted "
                          "(BackgroundSnapshotter.stats.failed)", RuntimeWarning, stacklevel=3)
