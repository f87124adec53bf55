"""Lightning callback: spectral snapshots every N optimizer steps, published to every attached logger.

::

    from lightning.pytorch import Trainer
    from spectral_plugins.lightning import SpectralMonitor

    trainer = Trainer(callbacks=[SpectralMonitor(every_n_steps=25)], logger=[...])

:class:`SpectralMonitor` is a thin shell around :class:`~spectral_plugins.runtime.tracker.SpectralTracker`:

- it fires when ``trainer.global_step`` changes (checked at each ``on_train_batch_end``), so under
  gradient accumulation a snapshot follows an optimizer step, never a micro-batch; the initial
  weights (step 0) are snapshotted at ``on_train_start``;
- it publishes natively through the loggers' ``.experiment`` to ``TensorBoardLogger``
  (:class:`~spectral_plugins.tensorboard.TensorBoardPublisher`), ``WandbLogger``
  (:class:`~spectral_plugins.wandb.WandbPublisher`) and ``MLFlowLogger``
  (:class:`~spectral_plugins.mlflow.MlflowPublisher`), recognised by class name in both
  ``lightning.pytorch.loggers`` and ``pytorch_lightning.loggers``, and with
  ``logger.log_metrics(scalars, step=global_step)`` to any other logger (``CSVLogger``);
- under DDP / FSDP2 (a process group of more than one rank) every rank computes its cost-balanced
  share of each snapshot and global rank zero assembles and publishes
  (:class:`~spectral_plugins.runtime.distributed.DistributedAnalyzer`); ``distributed=False`` leaves all the
  work to rank zero;
- ``state_dict`` / ``load_state_dict`` carry the tracker's history and last step through
  Lightning checkpoints, so a resumed fit continues its series without gaps or repeated steps;
- at fit end it publishes the run summary to every logger and logs it to the console.

The class derives from ``lightning.pytorch.Callback`` *and* ``pytorch_lightning.Callback`` when both
packages are installed (they are distinct classes), so one monitor works with either ``Trainer``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.model_map import map_model
from ..core.options import DEFAULT_OUTBOX_SIZE, DEFAULT_PUBLISH_TIMEOUT_S, check_options
from ..runtime.publishing import Publisher, RunSummary, StepReport
from ..runtime.tracker import DEFAULT_FAST_EVERY_N_STEPS, SpectralTracker

__all__ = [
    "INSTALL_HINT", "LOGGER_MODULES", "NATIVE_LOGGERS", "CONFIG_PREFIX", "logger_kind",
    "LoggerPublisher", "publisher_for", "SpectralMonitor",
]

INSTALL_HINT = "pip install 'spectral-plugins[lightning]'"
LOGGER_MODULES = ("lightning.pytorch.loggers", "pytorch_lightning.loggers")
NATIVE_LOGGERS = ("TensorBoardLogger", "WandbLogger", "MLFlowLogger")
CONFIG_PREFIX = "spectral/"


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:
            continue
    if not bases:
        raise ModuleNotFoundError(f"spectral_plugins.lightning needs Lightning: {INSTALL_HINT}")
    return tuple(bases)


def logger_kind(logger: Any) -> str | None:
    """"TensorBoardLogger", "WandbLogger" or "MLFlowLogger" when ``logger`` is (a subclass of) that
    Lightning logger from either package; None for any other logger."""
    for cls in type(logger).__mro__:
        if cls.__name__ in NATIVE_LOGGERS and cls.__module__.startswith(LOGGER_MODULES):
            return cls.__name__
    return None


class LoggerPublisher:
    """Publishes through a Lightning logger's generic API (``log_metrics`` / ``log_hyperparams``), for
    loggers without a native publisher such as ``CSVLogger``: flat scalars under the canonical keys."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.name = f"{type(logger).__name__}"

    def publish_config(self, config: Mapping[str, Any]) -> None:
        self.logger.log_hyperparams({f"{CONFIG_PREFIX}{key}": value for key, value in config.items()})

    def publish_step(self, report: StepReport) -> None:
        self.logger.log_metrics(report.scalars(), step=report.step)

    def publish_summary(self, summary: RunSummary) -> None:
        headline = summary.headline_scalars()
        if headline:
            self.logger.log_metrics(headline, step=summary.last.step)
        self.logger.save()

    def close(self) -> None:
        """Nothing to release: Lightning finalizes its loggers."""


def publisher_for(logger: Any) -> Publisher:
    """The native publisher of a TensorBoard / W&B / MLflow logger (through its ``.experiment``), a
    :class:`LoggerPublisher` for any other logger or when the native publisher is unavailable."""
    kind = logger_kind(logger)
    try:
        if kind == "TensorBoardLogger":
            from .tensorboard import TensorBoardPublisher

            return TensorBoardPublisher(writer=logger.experiment)
        if kind == "WandbLogger":
            from .wandb import WandbPublisher

            return WandbPublisher(run=logger.experiment)
        if kind == "MLFlowLogger":
            from .mlflow import MlflowPublisher

            return MlflowPublisher(run_id=logger.run_id, client=logger.experiment)
    except ImportError as error:
        warnings.warn(f"spectral-plugins: no native publisher for {kind} ({error}); "
                      "publishing flat scalars through log_metrics instead", RuntimeWarning, stacklevel=2)
    return LoggerPublisher(logger)


def _publisher_or_none(logger: Any) -> Publisher | None:
    try:
        return publisher_for(logger)
    except Exception as error:  # noqa: BLE001 - a logger we cannot use must not stop training
        warnings.warn(f"spectral-plugins: cannot publish to {type(logger).__name__} ({type(error).__name__}: "
                      f"{error}); the other loggers still get every snapshot", RuntimeWarning, stacklevel=3)
        return None


# The bases are chosen at import (the installed Lightning's Callback), which mypy cannot follow.
class SpectralMonitor(*_callback_bases()):  # type: ignore[misc]
    """Snapshots weight spectra every ``every_n_steps`` optimizer steps and publishes them to every
    logger of the trainer (see the module docs).

    Args:
        every_n_steps: snapshot when ``trainer.global_step % every_n_steps == 0`` (>= 1).
        metrics: per-matrix series to publish (default: alpha and stable rank; ``"all"``: every metric).
        series: ``"headline"`` (default): the short list of lifecycle and attention series and
            run-level figures; ``"all"``: every one
            (see :class:`~spectral_plugins.runtime.tracker.SpectralTracker`).
        include, exclude, roles: which matrices and how to name their roles (see
            :func:`~spectral_plugins.core.model_map.map_model`); patterns see the LightningModule's names.
        publish_heatmaps: depth x role heatmap images: True (alpha and stable rank), False, or the
            metric names to draw.
        method: engine method ("auto", "gram", "svd").
        extra_publishers: further sinks (any :class:`~spectral_plugins.runtime.publishing.Publisher`).
        history: keep the metric history and lifecycle signals (True, a cap of kept steps, or False).
        attention: also compute the attention logit bounds (True or keyword arguments of
            :func:`~spectral_plugins.attention.bounds.attention_bounds`).
        threads: CPU threads while a snapshot is computed (see
            :class:`~spectral_plugins.runtime.tracker.SpectralTracker`; None keeps torch's setting).
        background: compute the spectra on a worker thread from a copy of the weights taken at the
            step boundary, publishing each snapshot (tagged with its own step) when it is ready; at
            most one in flight, a due step reached meanwhile is skipped and counted (see
            :class:`~spectral_plugins.runtime.tracker.SpectralTracker`). Checkpoints and the fit-end summary
            wait for the snapshot in flight.
        distributed: under a multi-rank strategy, share each snapshot across the ranks (None, the
            default: whenever ``trainer.world_size > 1`` with torch.distributed initialised); False:
            rank zero computes everything alone. DDP and FSDP2 (``ModelParallelStrategy``) weights;
            ``FSDPStrategy`` (FSDP1's flat parameters) is not supported.
        per_expert: in a mixture of experts, publish every expert's matrices under their own keys too
            (by default each layer's mean, min and max over the experts).
        fast_every_n_steps: publish stable rank (and the norms, when published) every this many
            steps between full snapshots, from the fast lane (see
            :class:`~spectral_plugins.runtime.tracker.SpectralTracker`); None turns it off.
        outbox_size: entries each publisher's outbox keeps while its tracker is slow or down (see
            :class:`~spectral_plugins.runtime.tracker.SpectralTracker`; a full outbox drops its oldest
            entry, counted and warned about).
        publish_timeout_s: how long the end of the run waits for the outboxes to drain (what is left
            is counted lost).

    Raises:
        ValueError: at construction, any option that is invalid on its own (``every_n_steps`` or
            ``threads`` < 1, an unknown metric or method, ``history`` neither a bool nor >= 8, an
            unknown ``attention`` option, ...); at ``on_fit_start``, before any training step,
            ``include`` / ``exclude`` / ``roles`` patterns that select no matrix of the model. A
            string where names are expected is one name (``metrics="alpha"``).
    """

    def __init__(
        self,
        every_n_steps: int = 25,
        metrics: Sequence[str] | str | None = None,
        series: str = "headline",
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        roles: Mapping[str, str] | None = None,
        publish_heatmaps: bool | Sequence[str] = True,
        method: str = "auto",
        extra_publishers: Sequence[Publisher] = (),
        history: bool | int = True,
        attention: bool | Mapping[str, Any] = False,
        threads: int | None = 1,
        background: bool = False,
        distributed: bool | None = None,
        per_expert: bool = False,
        fast_every_n_steps: int | None = DEFAULT_FAST_EVERY_N_STEPS,
        outbox_size: int = DEFAULT_OUTBOX_SIZE,
        publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
    ) -> None:
        super().__init__()
        check_options(every_n_steps=every_n_steps, metrics=metrics, series=series, heatmap=publish_heatmaps,
                      include=include, exclude=exclude, roles=roles, method=method, history=history,
                      attention=attention, threads=threads, background=background, distributed=distributed,
                      fast_every_n_steps=fast_every_n_steps, outbox_size=outbox_size,
                      publish_timeout_s=publish_timeout_s, names={"heatmap": "publish_heatmaps"})
        self.options: dict[str, Any] = dict(
            every_n_steps=every_n_steps, metrics=metrics, series=series, include=include, exclude=exclude,
            roles=roles,
            method=method, heatmap=publish_heatmaps, history=history, attention=attention, threads=threads,
            background=background, per_expert=per_expert, fast_every_n_steps=fast_every_n_steps,
            outbox_size=outbox_size, publish_timeout_s=publish_timeout_s)
        self.distributed = distributed
        self.every_n_steps = every_n_steps
        self.extra_publishers = tuple(extra_publishers)
        self.tracker: SpectralTracker | None = None
        self.summary: RunSummary | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_global_step: int | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check ``include`` / ``exclude`` / ``roles`` against the model, the first moment it is known:
        a pattern set that selects no matrix (or a ``roles`` glob that names none) raises ValueError
        here, before the sanity check and the first training step."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what the map has to say is said once, by the tracker
            map_model(pl_module, include=self.options["include"], exclude=self.options["exclude"],
                      roles=self.options["roles"])

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Map the model, attach a publisher per logger, restore a checkpointed state, snapshot step 0."""
        shared = self._shares_work(trainer)
        if not trainer.is_global_zero and not shared:
            return
        state = self._pending_state or (self.tracker.state_dict() if self.tracker is not None else None)
        publishers: list[Publisher] = []
        if trainer.is_global_zero:
            publishers = [p for p in map(_publisher_or_none, trainer.loggers) if p is not None]
            publishers += self.extra_publishers
        self.tracker = SpectralTracker(pl_module, publishers=publishers, distributed=shared, **self.options)
        if state:
            self.tracker.load_state_dict(state)
        self._pending_state = None
        self._last_global_step = None
        self._observe(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Snapshot when ``global_step`` changed to a due step (once per optimizer step)."""
        self._observe(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Publish the run summary to every logger and the console (last snapshot at the final step)."""
        if self.tracker is not None:  # on every rank that has one (a collective when they share work)
            self.summary = self.tracker.finish(step=trainer.global_step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Flush and close the publishers (no summary: the fit did not finish)."""
        if self.tracker is not None:
            self.tracker.close()

    def _shares_work(self, trainer: Any) -> bool:
        """Whether the ranks share each snapshot: the trainer runs more than one process under an
        initialised torch.distributed group, and ``distributed`` is not False."""
        import torch.distributed as dist

        multi_rank = dist.is_available() and dist.is_initialized() and int(trainer.world_size) > 1
        return multi_rank and (self.distributed is None or bool(self.distributed))

    def _observe(self, trainer: Any) -> None:
        if self.tracker is None:
            return
        step = int(trainer.global_step)
        if step != self._last_global_step:
            self._last_global_step = step
            self.tracker.step(step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The tracker's state (history, last step) for Lightning checkpoints."""
        if self.tracker is not None:
            return self.tracker.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpointed state; applied when training starts (the tracker needs the model)."""
        if self.tracker is not None:
            self.tracker.load_state_dict(state_dict)
            self._last_global_step = None
        else:
            self._pending_state = dict(state_dict)
