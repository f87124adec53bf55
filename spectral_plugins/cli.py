"""The ``spectral-plugins`` command line: each subcommand lives with its concept and registers here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .core.engine import METHODS, ProgressCallback, SpectralEngine
from .core.metrics import METRIC_NAMES
from .core.snapshot import Snapshot, layer_table

# (module, function) pairs that add a subcommand; a module whose extra is missing is skipped.
_SUBCOMMANDS = (
    ("spectral_plugins.demo.cli", "add_demo_parser"),
    ("spectral_plugins.runs.compare", "add_compare_parser"),
    ("spectral_plugins.runs.report", "add_report_parser"),
    ("spectral_plugins.adapters.wandb_workspace", "add_wandb_workspace_parser"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectral-plugins",
        description="Spectral lifecycle of transformer weights: analyze checkpoints, run the demo, "
                    "compare and report tracked runs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    analyze = subparsers.add_parser(
        "analyze", help="spectra and metrics of a checkpoint or HF model dir",
        description="Spectra and metrics of every floating-point 2-D weight matrix with both sides >= 2 "
                    "(linear, embedding, attention projections). Convolution weights (3-D or more), "
                    "vector-shaped weights (1 x n, n x 1), 1-D tensors (biases, norm scales) and tensors "
                    "that are not floating point are skipped and listed after the table. A file that "
                    "cannot be read ends with exit status 2 and one line saying why.")
    analyze.add_argument("path", help="a .pt/.pth/.bin/.ckpt state dict, a .safetensors file, or a "
                                      "Hugging Face model directory (config.json + weights)")
    analyze.add_argument("--json", dest="json_out", help="write the snapshot as JSON to this file")
    analyze.add_argument("--method", choices=METHODS, default="auto", help="gram (default) or svd (float64)")
    analyze.add_argument("--dtype", choices=("float32", "float64"), default=None)
    analyze.add_argument("--include", action="append", help="glob on matrix names/keys to keep")
    analyze.add_argument("--exclude", action="append", help="glob on matrix names/keys to drop")
    analyze.set_defaults(handler=_run_analyze)
    for module_name, function in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        getattr(module, function)(subparsers)
    return parser


class CommandError(Exception):
    """A user mistake a subcommand reports as one line on stderr, exiting with status 2 (as argparse
    does for a bad argument) instead of a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CommandError as error:
        print(f"spectral-plugins {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def _run_analyze(args: argparse.Namespace) -> int:
    from .core.checkpoints import CheckpointError, load_model_map

    try:
        model_map, skipped = load_model_map(args.path, include=args.include, exclude=args.exclude)
    except (CheckpointError, OSError, ImportError, ValueError) as error:
        # OSError: missing path, no weights in the directory, a shard missing, no permission;
        # ValueError: nothing to analyse, or --include / --exclude selected no matrix.
        raise CommandError(error) from error
    engine = SpectralEngine(method=args.method, dtype=args.dtype)
    snapshot = engine.analyze(model_map, progress=_progress_bar(len(model_map)))
    print(format_table(snapshot))
    for line in skipped.lines():
        print(line)
    if args.json_out:
        Path(args.json_out).write_text(snapshot.to_json(indent=1))
        print(f"wrote {args.json_out}")
    return 0


def format_table(snapshot: Snapshot) -> str:
    """The per-layer table of the tracker's console summary, and how the spectra were computed."""
    return (f"{layer_table(snapshot, METRIC_NAMES)}\n{len(snapshot)} matrices, method={snapshot.method}, "
            f"dtype={snapshot.dtype}, {snapshot.seconds:.2f} s")


def _progress_bar(total: int) -> ProgressCallback:
    """A tqdm bar on stderr that the engine's ``(done, total)`` callbacks advance; it closes when all
    ``total`` matrices are done (and stays silent when stderr is not a terminal)."""
    bar = tqdm(total=total, desc="spectra", unit="matrix", file=sys.stderr, disable=None)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


if __name__ == "__main__":
    raise SystemExit(main())
