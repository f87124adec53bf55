"""The demo: train a small character-level GPT on CPU, watched by SpectralMonitor in three trackers.

:func:`run_demo` trains :class:`~spectral_plugins.demo.model.CharGPT` (4 blocks, d_model 128, 4 heads)
on the Python standard library's own sources with a Lightning ``Trainer`` on the CPU, while
:class:`~spectral_plugins.lightning.SpectralMonitor` snapshots its spectra every ``every_n_steps``
optimizer steps and publishes them at once to

- TensorBoard (``TensorBoardLogger``, event files under ``<out>/tensorboard``),
- MLflow (``MLFlowLogger`` on a local SQLite store ``<out>/mlflow.db``, artifacts in ``<out>/mlartifacts``),
- Weights & Biases in offline mode (``WandbLogger(offline=True)``, run files under ``<out>/wandb``),

then prints how to open each view. Nothing is downloaded and no account is needed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.engine import cpu_threads
from .data import VOCAB, CharWindows, encode, stdlib_text
from .model import GPTConfig

TRACKERS = ("tensorboard", "mlflow", "wandb")
EXPERIMENT = "spectral-demo"


@dataclass(frozen=True)
class DemoResult:
    """What a demo run produced and where.

    Attributes:
        out_dir: the root of everything written.
        tensorboard_dir: the TensorBoard log dir (``tensorboard --logdir``), or None.
        mlflow_uri: the MLflow backend store URI (``mlflow ui --backend-store-uri``), or None.
        mlflow_run_id: the MLflow run, or None.
        wandb_run_dir: the offline W&B run directory (``wandb sync``), or None.
        steps: optimizer steps trained; snapshot_steps: the steps snapshotted.
        final_loss: the last logged training loss.
        seconds: wall time of the whole demo.
        summary_text: the spectral summary printed at the end.
        instructions: the lines telling how to open each view.
    """

    out_dir: Path
    tensorboard_dir: Path | None
    mlflow_uri: str | None
    mlflow_run_id: str | None
    wandb_run_dir: Path | None
    steps: int
    snapshot_steps: tuple[int, ...]
    final_loss: float
    seconds: float
    summary_text: str
    instructions: tuple[str, ...] = field(default=())


def run_demo(
    out_dir: str | Path = "demo_runs",
    max_steps: int = 600,
    every_n_steps: int = 25,
    batch_size: int = 16,
    trackers: Sequence[str] = TRACKERS,
    config: GPTConfig | None = None,
    seed: int = 0,
    attention: bool = True,
    max_chars: int = 2_000_000,
    verbose: bool = True,
    threads: int | None = 1,
    lr: float = 3e-3,
) -> DemoResult:
    """Train the demo model and publish its spectra to the chosen trackers (see the module docs).

    Args:
        out_dir: where every tracker writes (created).
        max_steps: optimizer steps to train.
        every_n_steps: snapshot interval in optimizer steps.
        batch_size: windows per batch.
        trackers: any of "tensorboard", "mlflow", "wandb".
        config: the model's shape (default: 4 blocks, d_model 128, 4 heads, context 64).
        seed: seeds weights, data order and sampling.
        attention: also publish the attention logit bounds per snapshot.
        max_chars: characters of standard-library source to train on.
        verbose: show Lightning's progress bar and print the instructions.
        threads: CPU threads for the run (restored afterwards; None keeps torch's setting). The
            model is small: on 2 vCPUs one thread trained 400 steps in 86 s, two threads in 178 s.
        lr: the peak learning rate (AdamW); runs that differ only in it are what
            ``spectral-plugins compare`` is for.

    Raises:
        ValueError: an unknown tracker name, or ``max_steps`` / ``every_n_steps`` < 1.
    """
    unknown = sorted(set(trackers) - set(TRACKERS))
    if unknown:
        raise ValueError(f"unknown tracker(s) {unknown}; choose from {list(TRACKERS)}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    started = time.perf_counter()
    with cpu_threads(threads):
        return _train(Path(out_dir).resolve(), max_steps, every_n_steps, batch_size, trackers, config, seed,
                      attention, max_chars, verbose, started, lr)


def _train(out: Path, max_steps: int, every_n_steps: int, batch_size: int, trackers: Sequence[str],
           config: GPTConfig | None, seed: int, attention: bool, max_chars: int, verbose: bool,
           started: float, lr: float = 3e-3) -> DemoResult:
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from ..adapters.lightning import SpectralMonitor
    from .lightning import CharGPTModule

    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed, verbose=False)
    config = config or GPTConfig(vocab_size=len(VOCAB))
    dataset = CharWindows(encode(stdlib_text(max_chars)), config.block_size, max_steps * batch_size, seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    loggers = _loggers(out, trackers, f"chargpt-lr{lr:g}-seed{seed}")
    sample = dataset[0][0][None]
    monitor = SpectralMonitor(every_n_steps=every_n_steps,
                              attention={"sample_batch": sample} if attention else False)
    # One epoch holds exactly max_steps batches (the progress bar then reads "Epoch 0/0", not "0/-2").
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=1,
                      logger=list(loggers.values()) or False, callbacks=[monitor],
                      enable_checkpointing=False, log_every_n_steps=5, enable_progress_bar=verbose,
                      enable_model_summary=verbose, default_root_dir=str(out))
    module = CharGPTModule(config, lr=lr)
    trainer.fit(module, loader)
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    result = _result(out, loggers, trainer, monitor, loss, time.perf_counter() - started)
    if verbose:
        print("\n".join(result.instructions))
    return result


def _loggers(out: Path, trackers: Sequence[str], run_name: str = "chargpt") -> dict[str, Any]:
    loggers: dict[str, Any] = {}
    if "tensorboard" in trackers:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers["tensorboard"] = TensorBoardLogger(save_dir=str(out / "tensorboard"), name="chargpt")
    if "mlflow" in trackers:
        from lightning.pytorch.loggers import MLFlowLogger

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        loggers["mlflow"] = MLFlowLogger(experiment_name=EXPERIMENT,
                                         tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
                                         artifact_location=(out / "mlartifacts").as_uri(),
                                         run_name=f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if "wandb" in trackers:
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        loggers["wandb"] = WandbLogger(project=EXPERIMENT, save_dir=str(out), offline=True)
    return loggers


def _result(out: Path, loggers: dict[str, Any], trainer: Any, monitor: Any, loss: float,
            seconds: float) -> DemoResult:
    tensorboard_dir = Path(loggers["tensorboard"].save_dir) if "tensorboard" in loggers else None
    mlflow_uri = f"sqlite:///{out / 'mlflow.db'}" if "mlflow" in loggers else None
    mlflow_run_id = loggers["mlflow"].run_id if "mlflow" in loggers else None
    wandb_run_dir = None
    if "wandb" in loggers:
        run = loggers["wandb"].experiment
        wandb_run_dir = Path(run.dir).parent  # .../wandb/offline-run-*/files -> the run directory
        run.finish()
    history = monitor.tracker.history if monitor.tracker is not None else None
    steps = tuple(int(s) for s in history.steps) if history is not None else ()
    summary = monitor.summary.text if monitor.summary is not None else ""
    lines = [f"spectral-plugins demo: {trainer.global_step} steps in {seconds:.0f} s, final loss {loss:.3f}, "
             f"{len(steps)} snapshots. Open the views:"]
    if tensorboard_dir is not None:
        lines.append(f"  TensorBoard:  tensorboard --logdir {tensorboard_dir}")
    if mlflow_uri is not None:
        lines.append(f"  MLflow:       mlflow ui --backend-store-uri {mlflow_uri}   "
                     f"(experiment '{EXPERIMENT}', run {mlflow_run_id})")
    if wandb_run_dir is not None:
        lines.append(f"  W&B:          wandb sync {wandb_run_dir}   (uploads the offline run; needs a login)")
    return DemoResult(out, tensorboard_dir, mlflow_uri, mlflow_run_id, wandb_run_dir,
                      int(trainer.global_step), steps, loss, seconds, summary, tuple(lines))
