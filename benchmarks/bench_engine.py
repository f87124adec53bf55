"""Engine speed and accuracy, side by side in one run: ours vs WeightWatcher vs the bare floor.

The floor is the physical limit of the method: a loop of Gram product + ``eigvalsh`` alone, no
metrics. We time, on the same GPT-2-small-shaped matrices (random init, seeded):

- ``ours``: ``SpectralEngine().analyze`` (float64, the default) and with ``dtype="float32"``;
- ``floor``: Gram + eigvalsh loop at float64 and float32;
- ``svdvals``: a float64 ``torch.linalg.svdvals`` loop (the exact reference method);
- ``weightwatcher``: ``WeightWatcher(model).analyze()`` on the same matrices as ``nn.Linear`` s;

and print time ratios and max |d alpha| against WeightWatcher. With ``--write`` the table is stored
in docs/performance.md between the ``bench_engine`` markers.

Run: ``python benchmarks/bench_engine.py [--layers 12] [--repeats 2] [--write]``
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from spectral_plugins import SpectralEngine, map_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def gpt2_small_matrices(n_layer: int) -> list[torch.Tensor]:
    """The q, k, v, o, mlp_in, mlp_out matrices of a randomly initialised GPT-2 small."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer))
    return [ref.weight().clone() for ref in map_model(model) if ref.depth is not None]


def as_linear_model(matrices: list[torch.Tensor]) -> nn.Module:
    """The same matrices as plain nn.Linear layers, which every tool reads the same way."""
    layers = nn.ModuleList()
    for w in matrices:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        layers.append(layer)
    container = nn.Module()
    container.layers = layers
    return container


def floor(matrices: list[torch.Tensor], dtype: torch.dtype) -> None:
    for w in matrices:
        w = w.to(dtype)
        w = w if w.shape[0] <= w.shape[1] else w.t()
        torch.linalg.eigvalsh(w @ w.t())


def svdvals_loop(matrices: list[torch.Tensor]) -> None:
    for w in matrices:
        torch.linalg.svdvals(w.double())


def best_time(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12 = GPT-2 small)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="store the table in docs/performance.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    matrices = gpt2_small_matrices(args.layers)
    model = as_linear_model(matrices)
    model_map = map_model(model)
    timings: dict[str, float] = {}
    timings["floor float64"], _ = best_time(lambda: floor(matrices, torch.float64), args.repeats)
    timings["floor float32"], _ = best_time(lambda: floor(matrices, torch.float32), args.repeats)
    timings["ours float64"], ours = best_time(lambda: SpectralEngine().analyze(model_map), args.repeats)
    timings["ours float32"], ours32 = best_time(
        lambda: SpectralEngine(dtype="float32").analyze(model_map), args.repeats)
    timings["svdvals float64"], _ = best_time(lambda: svdvals_loop(matrices), 1)
    d_alpha_ww = d_alpha_ww32 = float("nan")
    try:
        import weightwatcher

        timings["weightwatcher"], details = best_time(
            lambda: weightwatcher.WeightWatcher(model=model).analyze(), 1)
        theirs = details["alpha"].to_numpy()
        d_alpha_ww = max(abs(a.alpha - b) for a, b in zip(ours.layers, theirs))
        d_alpha_ww32 = max(abs(a.alpha - b) for a, b in zip(ours32.layers, theirs))
    except ImportError:
        print("weightwatcher not installed (pip install 'spectral-plugins[dev]'): skipping it")

    ww = timings.get("weightwatcher", float("nan"))
    rows = [
        ("ours float64 / floor float64", timings["ours float64"] / timings["floor float64"]),
        ("ours float32 / floor float32", timings["ours float32"] / timings["floor float32"]),
        ("weightwatcher / ours float64", ww / timings["ours float64"]),
        ("weightwatcher / ours float32", ww / timings["ours float32"]),
        ("weightwatcher / floor float64", ww / timings["floor float64"]),
        ("svdvals float64 / ours float64", timings["svdvals float64"] / timings["ours float64"]),
    ]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [
        f"GPT-2-small-shaped blocks ({args.layers} layers, {len(matrices)} matrices, random init, seed 0); "
        f"{machine}; best of {args.repeats}.",
        "",
        "| timing | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.2f} |" for name, seconds in timings.items()],
        "",
        "| ratio | value |",
        "|---|---|",
        *[f"| {name} | {value:.2f} |" for name, value in rows],
        f"| max abs(d alpha) vs WeightWatcher, float64 | {d_alpha_ww:.2g} |",
        f"| max abs(d alpha) vs WeightWatcher, float32 | {d_alpha_ww32:.2g} |",
        "",
        f"Command: `python benchmarks/bench_engine.py --layers {args.layers} --repeats {args.repeats}"
        " --write`",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(DOC, "bench_engine", table)
        print(f"wrote {DOC}")


def write_section(path: Path, name: str, body: str, title: str = "Engine (bench_engine.py)") -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->``, or append it
    under a ``## title`` heading."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Performance\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
