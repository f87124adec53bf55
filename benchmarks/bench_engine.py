"""Engine speed and accuracy, side by side in one run: ours vs WeightWatcher vs the bare floor.

The floor is the physical limit of the method: a loop of Gram product + ``eigvalsh`` alone, no
metrics. For each model (``--models``: GPT-2 small, GPT-2 medium, a 1.1B Llama-shaped model; random
init, seeded; the matrices of the transformer blocks) we time, on the same matrices:

- ``ours``: ``SpectralEngine().analyze`` (float64, the default) and with ``dtype="float32"``;
- ``floor``: Gram + eigvalsh loop at float64 and float32;
- ``svdvals``: a float64 ``torch.linalg.svdvals`` loop (the exact reference method);
- ``weightwatcher``: ``WeightWatcher(model).analyze()`` on the same matrices as ``nn.Linear`` s;

and print time ratios and max |d alpha| against WeightWatcher. With ``--write`` the tables are
stored in docs/performance.md between the ``bench_engine`` markers.

Run: ``python benchmarks/bench_engine.py [--models gpt2-small gpt2-medium llama-1b] [--repeats 2]
[--device cuda] [--write]`` (on CUDA every timing ends with a device synchronisation, WeightWatcher
runs on its own terms on the same matrices, and the tables go to their own ``bench_engine_cuda``
section)
(the 1.1B model takes about half an hour on 2 CPU cores, most of it WeightWatcher and svdvals).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from spectral_plugins import SpectralEngine, map_model

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_engine
    from common import DOC, llama_shaped, machine, write_section
except ImportError:  # pragma: no cover
    from benchmarks.common import DOC, llama_shaped, machine, write_section

MODELS = ("gpt2-small", "gpt2-medium", "llama-1b")


def block_matrices(name: str, device: torch.device) -> list[torch.Tensor]:
    """The matrices of the transformer blocks (q, k, v, o and MLP; no embeddings) of model ``name``."""
    if name == "llama-1b":
        model = llama_shaped("1B")
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config() if name == "gpt2-small" else GPT2Config(n_embd=1024, n_layer=24, n_head=16)
        model = GPT2LMHeadModel(config)
    return [ref.weight().clone().to(device) for ref in map_model(model) if ref.depth is not None]


def as_linear_model(matrices: list[torch.Tensor]) -> nn.Module:
    """The same matrices as plain nn.Linear layers, which every tool reads the same way."""
    layers = nn.ModuleList()
    for w in matrices:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
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


def synchronize() -> None:
    """Wait for queued GPU work, so that a timing covers the work and not only its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = function()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(name: str, repeats: int, skip: set[str], device: torch.device) -> dict[str, float]:
    """Timings (seconds, best of ``repeats``; svdvals and WeightWatcher once) and max |d alpha|."""
    matrices = block_matrices(name, device)
    model = as_linear_model(matrices)
    model_map = map_model(model)
    print(f"{name}: {len(matrices)} matrices", flush=True)
    out: dict[str, float] = {"matrices": len(matrices),
                             "parameters": sum(w.numel() for w in matrices)}
    out["floor float64"], _ = best_time(lambda: floor(matrices, torch.float64), repeats)
    out["floor float32"], _ = best_time(lambda: floor(matrices, torch.float32), repeats)
    out["ours float64"], ours = best_time(lambda: SpectralEngine().analyze(model_map), repeats)
    out["ours float32"], ours32 = best_time(
        lambda: SpectralEngine(dtype="float32").analyze(model_map), repeats)
    out["svdvals float64"] = float("nan")
    if "svdvals" not in skip:
        out["svdvals float64"], _ = best_time(lambda: svdvals_loop(matrices), 1)
    out["weightwatcher"] = out["d alpha 64"] = out["d alpha 32"] = float("nan")
    if "weightwatcher" not in skip:
        try:
            import weightwatcher
        except ImportError:
            print("weightwatcher not installed (pip install 'spectral-plugins[dev]'): skipping it")
        else:
            out["weightwatcher"], details = best_time(
                lambda: weightwatcher.WeightWatcher(model=model).analyze(), 1)
            theirs = details["alpha"].to_numpy()
            out["d alpha 64"] = max(abs(a.alpha - b) for a, b in zip(ours.layers, theirs))
            out["d alpha 32"] = max(abs(a.alpha - b) for a, b in zip(ours32.layers, theirs))
    print("  " + ", ".join(f"{k} {v:.3g}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["gpt2-small", "gpt2-medium"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", nargs="*", choices=("svdvals", "weightwatcher"), default=[],
                        help="leave out the slow references")
    parser.add_argument("--device", default="cpu", help="where the matrices live (cpu, cuda)")
    parser.add_argument("--write", action="store_true", help="store the tables in docs/performance.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    results = {name: measure(name, args.repeats, set(args.skip), device) for name in args.models}

    timing_names = ("floor float64", "ours float64", "floor float32", "ours float32", "svdvals float64",
                    "weightwatcher")
    ratio_names = ("ours / floor, float64", "ours / floor, float32", "weightwatcher / ours, float64",
                   "weightwatcher / ours, float32", "weightwatcher / floor, float64",
                   "svdvals / ours, float64", "max abs(d alpha) vs WW, float64",
                   "max abs(d alpha) vs WW, float32")

    def ratios(r: dict[str, float]) -> tuple[float, ...]:
        return (r["ours float64"] / r["floor float64"], r["ours float32"] / r["floor float32"],
                r["weightwatcher"] / r["ours float64"], r["weightwatcher"] / r["ours float32"],
                r["weightwatcher"] / r["floor float64"], r["svdvals float64"] / r["ours float64"],
                r["d alpha 64"], r["d alpha 32"])

    header = "| | " + " | ".join(args.models) + " |"
    rule = "|---" * (len(args.models) + 1) + "|"
    lines = [
        f"Transformer-block matrices of randomly initialised models (seed 0); {machine(device)}; "
        f"best of {args.repeats} (svdvals and WeightWatcher: one run); nan: not run.",
        "",
        header, rule,
        "| matrices | " + " | ".join(f"{results[m]['matrices']:.0f}" for m in args.models) + " |",
        "| parameters | " + " | ".join(f"{results[m]['parameters'] / 1e6:.0f}M" for m in args.models) + " |",
        *[f"| {t} s | " + " | ".join(f"{results[m][t]:.2f}" for m in args.models) + " |"
          for t in timing_names],
        "",
        header, rule,
        *[f"| {label} | " + " | ".join(
            (f"{ratios(results[m])[i]:.2g}" if label.startswith("max") else f"{ratios(results[m])[i]:.2f}")
            for m in args.models) + " |" for i, label in enumerate(ratio_names)],
        "",
        "Command: `python benchmarks/bench_engine.py --models " + " ".join(args.models)
        + f" --repeats {args.repeats}" + (" --skip " + " ".join(args.skip) if args.skip else "")
        + ("" if device.type == "cpu" else f" --device {args.device}") + " --write`",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        section = "bench_engine" if device.type == "cpu" else "bench_engine_cuda"
        title = "Engine (bench_engine.py)" if device.type == "cpu" else "Engine on the GPU (--device cuda)"
        write_section(DOC, section, table, title)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
