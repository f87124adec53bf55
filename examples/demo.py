"""Train a small character-level GPT on CPU and watch its weight spectra in three trackers at once.

    python examples/demo.py                 # 600 steps, about 2-3 minutes on 2 CPU cores
    python examples/demo.py --max-steps 50  # a quick look

Same as ``spectral-plugins demo``. Everything is written below ``--out-dir`` (default ``demo_runs``):
TensorBoard event files, a local MLflow SQLite store and an offline W&B run. At the end it prints
the commands that open each view.
"""

from __future__ import annotations

import argparse

from spectral_plugins.demo import run_demo


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out-dir", default="demo_runs")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--every-n-steps", type=int, default=25)
    args = parser.parse_args()
    run_demo(out_dir=args.out_dir, max_steps=args.max_steps, every_n_steps=args.every_n_steps)


if __name__ == "__main__":
    main()
