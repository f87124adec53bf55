"""Snapshot time vs model size (Llama-shaped, random init) and vs number of gloo ranks.

1. Size: one full snapshot (``SpectralEngine().analyze``) of Llama-shaped models of ~30M, ~125M and
   ~350M parameters (``--sizes``; ``--with-1b`` adds a TinyLlama-shaped 1.1B, several minutes on
   CPU), printed next to each other with the ratios of parameters, of estimated cost
   (``sum m n k + k^3``, :func:`spectral_plugins.runtime.distributed.matrix_cost`)
   and of time to the smallest.
2. Ranks: ``DistributedAnalyzer.analyze`` of one model (``--ranks-model``) on 1, 2 and 4 gloo CPU
   processes (``--ranks``), each rank with ``--threads-per-rank`` torch threads; the wall time on rank
   0 (from a barrier to the assembled snapshot) and the slowest rank's own compute time, with their
   ratios to one rank. On a machine with fewer cores than ranks x threads the ranks share cores, so
   the times cannot fall as 1 / world size there; the table states the core count.

Run: ``python benchmarks/bench_scaling.py [--sizes 30M 125M 350M] [--with-1b] [--ranks 1 2 4] [--write]``
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spectral_plugins import SpectralEngine, map_model
from spectral_plugins.runtime.distributed import DistributedAnalyzer, matrix_cost, plan

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_scaling
    from common import DOC, LLAMA_CONFIGS, llama_shaped, machine, write_section
except ImportError:  # pragma: no cover
    from benchmarks.common import DOC, LLAMA_CONFIGS, llama_shaped, machine, write_section

def size_table(names: list[str], dtype: str | None, repeats: int, device: torch.device) -> str:
    engine = SpectralEngine(dtype=dtype)
    rows = []
    for name in names:
        model = llama_shaped(name).to(device)  # the engine computes where the weights are
        model_map = map_model(model)
        params = sum(p.numel() for p in model.parameters())
        cost = sum(matrix_cost(ref.shape) for ref in model_map)
        best = float("inf")
        if device.type == "cuda" and not rows:
            engine.analyze(model_map)  # warm-up: CUDA context, cuBLAS / cuSOLVER handles
        for _ in range(repeats):
            start = time.perf_counter()
            engine.analyze(model_map)
            best = min(best, time.perf_counter() - start)
        rows.append((name, params, len(model_map), cost, best))
        print(f"  {name}: {params / 1e6:.0f}M parameters, {len(model_map)} matrices, {best:.2f} s",
              flush=True)
        del model, model_map
    _, p0, _, c0, t0 = rows[0]
    lines = [
        f"One snapshot (`SpectralEngine(dtype={dtype!r}).analyze`) on {device}, Llama-shaped models, random "
        f"init; best of {repeats}; {torch.get_num_threads()} torch thread(s); {machine(device)}.",
        "",
        "| model | parameters | matrices | seconds | params / first | cost / first | time / first | "
        "time / cost, vs first |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {n} | {p / 1e6:.0f}M | {m} | {t:.2f} | {p / p0:.1f} | {c / c0:.1f} | {t / t0:.1f} | "
          f"{(t / c) / (t0 / c0):.2f} |" for n, p, m, c, t in rows],
    ]
    return "\n".join(lines)


def _rank_worker(rank: int, world: int, name: str, threads: int, repeats: int, folder: str) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    try:
        model_map = map_model(llama_shaped(name))
        analyzer = DistributedAnalyzer(SpectralEngine())
        best_wall, best_rank = float("inf"), float("inf")
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            snapshot = analyzer.analyze(model_map, step=0)
            if rank == 0:
                assert snapshot is not None and all(layer.finite for layer in snapshot)
                best_wall = min(best_wall, time.perf_counter() - start)
                best_rank = min(best_rank, max(analyzer.last_rank_seconds))
        if rank == 0:
            units = plan(model_map, world)
            loads = [sum(u.cost for u in units if u.owner == r) for r in range(world)]
            imbalance = max(loads) / (sum(loads) / world)
            with open(Path(folder) / "result.pkl", "wb") as f:
                pickle.dump((best_wall, best_rank, imbalance), f)
    finally:
        dist.destroy_process_group()


def ranks_table(name: str, worlds: list[int], threads: int, repeats: int) -> str:
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as folder:
            mp.start_processes(_rank_worker, args=(world, name, threads, repeats, folder), nprocs=world,
                               start_method="spawn")
            with open(Path(folder) / "result.pkl", "rb") as f:
                wall, slowest, imbalance = pickle.load(f)
        rows.append((world, wall, slowest, imbalance))
        print(f"  {world} rank(s): {wall:.2f} s wall, slowest rank {slowest:.2f} s", flush=True)
    _, w1, s1, _ = rows[0]
    lines = [
        f"`DistributedAnalyzer.analyze` of the {name} Llama-shaped model on gloo CPU processes, "
        f"{threads} torch thread(s) per rank; best of {repeats}; {machine()}.",
        "",
        "| ranks | wall s (rank 0) | slowest rank's compute s | wall / 1 rank | slowest / 1 rank | "
        "1 / ranks | est. max load / mean |",
        "|---|---|---|---|---|---|---|",
        *[f"| {w} | {wall:.2f} | {s:.2f} | {wall / w1:.2f} | {s / s1:.2f} | {1 / w:.2f} | {imb:.2f} |"
          for w, wall, s, imb in rows],
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["30M", "125M", "350M"], choices=list(LLAMA_CONFIGS))
    parser.add_argument("--with-1b", action="store_true", help="add the 1.1B model (minutes on CPU)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default=None,
                        help="engine dtype (default: the engine's, float64 on CPU, float32 on GPU)")
    parser.add_argument("--device", default="cpu", help="where the size part's weights live (cuda for GPU)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--ranks", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--ranks-model", choices=list(LLAMA_CONFIGS), default="125M")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the size part")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="store the tables in docs/performance.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = list(args.sizes) + (["1B"] if args.with_1b and "1B" not in args.sizes else [])
    command = " ".join([
        "python benchmarks/bench_scaling.py --sizes", *args.sizes, *(["--with-1b"] if args.with_1b else []),
        *([f"--dtype {args.dtype}"] if args.dtype else []),
        f"--device {args.device} --repeats {args.repeats}",
        "--ranks", *map(str, args.ranks), f"--ranks-model {args.ranks_model}",
        *([f"--threads {args.threads}"] if args.threads else []),
        f"--threads-per-rank {args.threads_per_rank} --write"])
    sections = []
    if sizes:
        print("snapshot time vs model size", flush=True)
        sections.append(("bench_scaling_size", "Snapshot time vs model size (bench_scaling.py)",
                         size_table(sizes, args.dtype, args.repeats, torch.device(args.device))))
    if args.ranks:
        print("snapshot time vs ranks", flush=True)
        sections.append(("bench_scaling_ranks", "Snapshot time vs gloo ranks (bench_scaling.py)",
                         ranks_table(args.ranks_model, args.ranks, args.threads_per_rank, args.repeats)))
    for name, title, table in sections:
        body = f"{table}\n\nCommand: `{command}`"
        print(f"\n{body}")
        if args.write:
            write_section(DOC, name, body, title)
    if args.write:
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
