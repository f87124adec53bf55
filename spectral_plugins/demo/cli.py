"""The ``spectral-plugins demo`` subcommand (registered by :mod:`spectral_plugins.cli`)."""

from __future__ import annotations

import argparse
from typing import Any

from .run import TRACKERS


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to an ``argparse`` subparsers object; its handler is ``args.handler(args)``."""
    parser = subparsers.add_parser(
        "demo", help="train a small char-level GPT on CPU; watch its spectra in TensorBoard, MLflow, W&B",
        description="Train a 4-block character-level GPT on the Python standard library's sources (CPU, "
                    "a few minutes) with SpectralMonitor logging to local TensorBoard, local MLflow "
                    "(SQLite) and offline W&B at once, then print how to open each view.")
    parser.add_argument("--out-dir", default="demo_runs",
                        help="where every tracker writes (default: demo_runs)")
    parser.add_argument("--max-steps", type=int, default=600, help="optimizer steps (default: 600)")
    parser.add_argument("--every-n-steps", type=int, default=25, help="snapshot interval (default: 25)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per batch (default: 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--trackers", default=",".join(TRACKERS),
                        help=f"comma-separated subset of {','.join(TRACKERS)} (default: all)")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention logit bounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default: 1, fastest for this small model; 0: torch's default)")
    parser.set_defaults(handler=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    from .run import run_demo

    trackers = [name.strip() for name in args.trackers.split(",") if name.strip()]
    run_demo(out_dir=args.out_dir, max_steps=args.max_steps, every_n_steps=args.every_n_steps,
             batch_size=args.batch_size, trackers=trackers, seed=args.seed, attention=not args.no_attention,
             threads=args.threads or None, lr=args.lr)
    return 0
