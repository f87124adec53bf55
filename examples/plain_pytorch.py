"""SpectralTracker in a plain PyTorch loop (no Lightning): snapshots every 25 steps to TensorBoard.

    python examples/plain_pytorch.py --out-dir runs/plain
    tensorboard --logdir runs/plain

Add more sinks to ``publishers``: ``MlflowPublisher(tracking_uri="sqlite:///mlflow.db")`` from
``spectral_plugins.mlflow``, ``WandbPublisher()`` from ``spectral_plugins.wandb`` after
``wandb.init(...)``. A sink that fails warns once and never stops training.
"""

from __future__ import annotations

import argparse

import torch

from spectral_plugins.demo.data import VOCAB, CharWindows, encode, stdlib_text
from spectral_plugins.demo.model import CharGPT, GPTConfig
from spectral_plugins.tensorboard import TensorBoardPublisher
from spectral_plugins.tracker import SpectralTracker


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out-dir", default="runs/plain")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every-n-steps", type=int, default=25)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(VOCAB), n_layer=4, d_model=128, n_head=4, block_size=64)
    model = CharGPT(config)
    data = CharWindows(encode(stdlib_text(500_000)), config.block_size, args.steps * 16, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    tracker = SpectralTracker(model, every_n_steps=args.every_n_steps,
                              publishers=[TensorBoardPublisher(args.out_dir)])
    tracker.step(0)  # the initial weights: the lifecycle signals are relative to this snapshot
    for step, (x, y) in enumerate(loader, start=1):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        report = tracker.step(step)  # a StepReport every `every_n_steps` steps, else None
        if report is not None:
            alpha = report.snapshot.layer("L03_q").alpha
            print(f"step {step}: loss {loss.item():.3f}, alpha of L03_q {alpha:.3f}")
    tracker.finish()  # last snapshot, summary (per-layer table, lifecycle, pruning advice), close
    print(f"tensorboard --logdir {args.out_dir}")


if __name__ == "__main__":
    main()
