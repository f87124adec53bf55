"""Heatmap drawing: one image per grid, the same from any thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from spectral_plugins.core.heatmap import ColourScale, Heatmap

pytest.importorskip("matplotlib")

ROLES = ("q", "k", "v", "o", "mlp_in", "mlp_out")


def log_scaled_heatmap(seed: int) -> Heatmap:
    """A fresh (undrawn) grid on a log colour scale: its colour bar has mathtext tick labels, the
    part of matplotlib that broke when two threads drew at once."""
    values = np.random.default_rng(seed).uniform(0.5, 40.0, size=(4, len(ROLES)))
    return Heatmap("stable_rank", 10, (0, 1, 2, 3), ROLES, values, scale=ColourScale(0.1, 60.0, log=True))


def test_threads_drawing_at_once_get_the_images_drawn_alone() -> None:
    rounds, threads = 6, 4
    alone = [log_scaled_heatmap(seed).to_rgb() for seed in range(threads)]
    errors: list[BaseException] = []
    images: dict[tuple[int, int], np.ndarray] = {}
    barrier = threading.Barrier(threads)

    def draw(seed: int) -> None:
        for round_ in range(rounds):
            barrier.wait()  # start every round's drawings together
            try:
                images[round_, seed] = log_scaled_heatmap(seed).to_rgb()
            except BaseException as error:  # noqa: BLE001 - collected and asserted below
                errors.append(error)

    workers = [threading.Thread(target=draw, args=(seed,)) for seed in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert len(images) == rounds * threads
    for (_, seed), image in images.items():
        np.testing.assert_array_equal(image, alone[seed])


def test_a_grid_is_drawn_once_however_many_ask() -> None:
    heatmap = log_scaled_heatmap(0)
    first = heatmap.to_rgb()
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3
    assert heatmap.to_rgb() is first
