"""Run one function in several spawned processes (the ranks of a gloo test), failing instead of hanging."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch.multiprocessing as mp


def run_ranks(target: Callable[..., None], world: int, args: tuple, timeout: float) -> None:
    """Call ``target(rank, *args)`` in ``world`` spawned processes; assert they all exit with 0 within
    ``timeout`` seconds (ranks still running then are killed and the assertion names them)."""
    context = mp.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, *args), daemon=True) for rank in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} still running after {timeout} s (a collective hung)"
    codes = [p.exitcode for p in processes]
    assert codes == [0] * world, f"exit codes {codes}"
