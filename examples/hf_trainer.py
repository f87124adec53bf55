"""SpectralCallback in a Hugging Face Trainer: a small GPT-2 (random init, built from a config, nothing
downloaded) learns the Python standard library's sources character by character; the spectral panels go
to TensorBoard and to a local MLflow store next to the Trainer's own loss curves.

    python examples/hf_trainer.py --out-dir runs/hf
    tensorboard --logdir runs/hf/runs
    mlflow ui --backend-store-uri sqlite:///runs/hf/mlflow.db

Needs ``pip install 'spectral-plugins[hf,tensorboard,mlflow]'``. Add ``"wandb"`` to ``report_to`` (after
``wandb login``, or with ``WANDB_MODE=offline``) and the same panels appear in the W&B run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from spectral_plugins.demo.data import VOCAB, encode, stdlib_text
from spectral_plugins.hf import SpectralCallback


class CharWindows(Dataset):
    """Seeded random windows of a character-id stream, as ``{"input_ids", "labels"}`` for a causal LM
    (the model shifts the labels itself)."""

    def __init__(self, ids: torch.Tensor, block_size: int, num_samples: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids, self.block_size = ids, block_size
        self.starts = torch.randint(0, len(ids) - block_size, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.starts[i])
        window = self.ids[start:start + self.block_size]
        return {"input_ids": window, "labels": window}


def use_local_mlflow(out_dir: Path, experiment: str) -> None:
    """Point the Trainer's MLflow integration at ``out_dir/mlflow.db``, artifacts in ``out_dir/mlartifacts``
    (unless ``MLFLOW_TRACKING_URI`` is already set)."""
    from mlflow import MlflowClient

    uri = os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(out_dir / 'mlflow.db').resolve()}")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", experiment)
    client = MlflowClient(tracking_uri=uri)
    name = os.environ["MLFLOW_EXPERIMENT_NAME"]
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=(out_dir / "mlartifacts").resolve().as_uri())


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/hf"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every-n-steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    use_local_mlflow(args.out_dir, "spectral-hf-demo")

    torch.manual_seed(0)
    block_size = 64
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=block_size, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)  # random init: the lifecycle is relative to these weights (step 0)
    data = CharWindows(encode(stdlib_text(1_000_000)), block_size, args.steps * args.batch_size)

    training = TrainingArguments(
        output_dir=str(args.out_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=3e-3, warmup_steps=min(20, args.steps // 10), lr_scheduler_type="cosine",
        weight_decay=0.01, logging_steps=10, save_strategy="no", use_cpu=True, disable_tqdm=True,
        report_to=["tensorboard", "mlflow"], seed=0)
    callback = SpectralCallback(every_n_steps=args.every_n_steps)
    Trainer(model=model, args=training, train_dataset=data, callbacks=[callback]).train()

    if callback.summary is not None:
        final = callback.summary.last.snapshot
        print(f"final snapshot at step {final.step}: {len(final.layers)} matrices")
    print(f"tensorboard --logdir {args.out_dir / 'runs'}")
    print(f"mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']}")


if __name__ == "__main__":
    main()
