"""Hugging Face ``Trainer`` callback: spectral snapshots every N optimizer steps, published to the
trackers the Trainer reports to.

::

    from transformers import Trainer, TrainingArguments
    from spectral_plugins.hf import SpectralCallback

    args = TrainingArguments("out", report_to=["tensorboard", "mlflow"], ...)
    Trainer(model, args, train_dataset=data, callbacks=[SpectralCallback(every_n_steps=25)]).train()

:class:`SpectralCallback` is a thin shell around :class:`~spectral_plugins.runtime.tracker.SpectralTracker`
(the Lightning :class:`~spectral_plugins.lightning.SpectralMonitor` is its twin):

- it snapshots the initial weights at ``on_train_begin`` and then in ``on_step_end`` whenever
  ``state.global_step`` (optimizer steps, so gradient accumulation never repeats a step) is a
  multiple of ``every_n_steps``; only the main process (``state.is_world_process_zero``) works;
- it publishes natively to the trackers named in ``args.report_to``: TensorBoard through the very
  ``SummaryWriter`` of the Trainer's ``TensorBoardCallback`` (one run, one event file: TensorBoard's
  live view follows only the newest file of a directory), MLflow to the run the Trainer's
  ``MLflowCallback`` started (the active run), W&B to the active ``wandb.run``; explicit
  ``publishers`` are added (with ``report_to="none"`` they are the only ones);
- at ``on_train_end`` it takes the last snapshot, publishes the run summary (final per-layer table,
  lifecycle summaries) to every tracker and logs it to the console;
- it is an ``ExportableState``: the tracker's history and last step are saved in every checkpoint's
  ``trainer_state.json`` and restored by ``trainer.train(resume_from_checkpoint=...)``, so the series
  continue without gaps or repeated steps.

This module imports ``transformers`` (the class derives from ``TrainerCallback``); importing
``spectral_plugins`` never imports it.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.options import DEFAULT_OUTBOX_SIZE, DEFAULT_PUBLISH_TIMEOUT_S, check_options, name_list
from ..runtime.publishing import Publisher, RunSummary, console
from ..runtime.tracker import DEFAULT_FAST_EVERY_N_STEPS, SpectralTracker

__all__ = [
    "INSTALL_HINT", "NATIVE_TRACKERS", "NOT_TRACKERS", "TENSORBOARD_SUBDIR", "SpectralCallback",
    "trainer_callbacks",
]

INSTALL_HINT = "pip install 'spectral-plugins[hf]'"
# report_to names with a native publisher (each publisher's ``name`` is the same string).
NATIVE_TRACKERS = ("tensorboard", "mlflow", "wandb")
# report_to names that are no metric tracker (nothing to publish to, no warning).
NOT_TRACKERS = ("codecarbon",)
# Sub-run of the Trainer's TensorBoard directory used when its writer cannot be shared.
TENSORBOARD_SUBDIR = "spectral"

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ModuleNotFoundError as _error:  # pragma: no cover - exercised only without transformers
    raise ModuleNotFoundError(f"spectral_plugins.hf needs transformers: {INSTALL_HINT}",
                              name="transformers") from _error


class SpectralCallback(TrainerCallback, ExportableState):
    """Snapshots weight spectra every ``every_n_steps`` optimizer steps and publishes them to the
    Trainer's trackers (see the module docs).

    Args:
        every_n_steps: snapshot when ``state.global_step % every_n_steps == 0`` (>= 1).
        metrics: per-matrix series to publish (default: alpha and stable rank; ``"all"``: every metric).
        series: ``"headline"`` (default): the short list of lifecycle and attention series and
            run-level figures; ``"all"``: every one
            (see :class:`~spectral_plugins.runtime.tracker.SpectralTracker`).
        include, exclude, roles: which matrices and how to name their roles (see
            :func:`~spectral_plugins.core.model_map.map_model`).
        publishers: further sinks (any :class:`~spectral_plugins.runtime.publishing.Publisher`); a publisher
            named like a tracker (``"tensorboard"``, ``"mlflow"``, ``"wandb"``) replaces the automatic one.
        heatmap: depth x role heatmap images: True (alpha and stable rank), False, or metric names.
        attention: also compute the attention logit bounds (True or keyword arguments of
            :func:`~spectral_plugins.attention.bounds.attention_bounds`).
        history: keep the metric history and lifecycle signals (True, a cap of kept steps, or False).
        method: engine method ("auto", "gram", "svd").
        report_to: trackers to publish to; None (default) follows ``TrainingArguments.report_to``,
            ``"none"`` publishes to ``publishers`` only.
        device: where spectra are computed (default: where the weights live).
        threads: CPU threads while a snapshot is computed (see
            :class:`~spectral_plugins.runtime.tracker.SpectralTracker`; None keeps torch's setting).
        background: compute the spectra on a worker thread from a copy of the weights taken at the
            step boundary, publishing each snapshot (tagged with its own step) when it is ready; at
            most one in flight, a due step reached meanwhile is skipped and counted (see
            :class:`~spectral_plugins.runtime.tracker.SpectralTracker`). Checkpoints and the train-end summary
            wait for the snapshot in flight.
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
            unknown ``attention`` option, a device torch cannot parse, ...); at ``on_train_begin``,
            before any training step, ``include`` / ``exclude`` / ``roles`` patterns that select no
            matrix of the model. A string where names are expected is one name (``metrics="alpha"``).
    """

    def __init__(
        self,
        every_n_steps: int = 25,
        metrics: Sequence[str] | str | None = None,
        series: str = "headline",
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        roles: Mapping[str, str] | None = None,
        publishers: Sequence[Publisher] = (),
        heatmap: bool | Sequence[str] = True,
        attention: bool | Mapping[str, Any] = False,
        history: bool | int = True,
        method: str = "auto",
        report_to: str | Sequence[str] | None = None,
        device: str | None = None,
        threads: int | None = 1,
        background: bool = False,
        per_expert: bool = False,
        fast_every_n_steps: int | None = DEFAULT_FAST_EVERY_N_STEPS,
        outbox_size: int = DEFAULT_OUTBOX_SIZE,
        publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
    ) -> None:
        check_options(every_n_steps=every_n_steps, metrics=metrics, series=series, heatmap=heatmap,
                      include=include, exclude=exclude, roles=roles, method=method, history=history,
                      attention=attention, device=device, threads=threads, background=background,
                      fast_every_n_steps=fast_every_n_steps, outbox_size=outbox_size,
                      publish_timeout_s=publish_timeout_s)
        if report_to is not None:
            name_list("report_to", report_to)
        self.options: dict[str, Any] = dict(
            every_n_steps=every_n_steps, metrics=metrics, series=series, include=include, exclude=exclude,
            roles=roles,
            method=method, heatmap=heatmap, history=history, attention=attention, device=device,
            threads=threads, background=background, per_expert=per_expert,
            fast_every_n_steps=fast_every_n_steps, outbox_size=outbox_size,
            publish_timeout_s=publish_timeout_s)
        self.every_n_steps = every_n_steps
        self.publishers = tuple(publishers)
        self.report_to = report_to
        self.tracker: SpectralTracker | None = None
        self.summary: RunSummary | None = None
        self._pending_state: dict[str, Any] | None = None
        self._unrestored: list[str] = []
        self._shared_writer: tuple[Any, Any] | None = None  # (TensorBoardCallback, its SummaryWriter)

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Map the model, attach a publisher per tracker, restore a checkpointed state, snapshot the
        current step (the initial weights, or nothing new when resuming at a snapshotted step)."""
        if not state.is_world_process_zero or model is None:
            return
        saved = self._saved_state(state)
        if self._unrestored:
            warnings.warn("spectral-plugins: the Trainer rebuilt SpectralCallback from a checkpoint "
                          "(restore_callback_states_from_checkpoint=True); these options cannot be saved in "
                          f"a checkpoint and are not restored: {', '.join(self._unrestored)}",
                          RuntimeWarning, stacklevel=2)
            self._unrestored = []
        self.tracker = SpectralTracker(model, publishers=self.publishers, **self.options)
        for publisher in self._tracker_publishers(args, self.tracker.heatmap_metrics):
            self.tracker.add_publisher(publisher)
        if saved:
            self.tracker.load_state_dict(saved)
        self._announce([guarded.publisher for guarded in self.tracker.publishers])
        self.tracker.step(int(state.global_step))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Snapshot when ``state.global_step`` (called once per optimizer step) is due. After the last
        step, wait for the publishers to take every report: the Trainer's own TensorBoard callback
        closes the writer they may share before :meth:`on_train_end` runs."""
        if self.tracker is not None and state.is_world_process_zero:
            self.tracker.step(int(state.global_step))
            if control.should_training_stop or state.global_step >= state.max_steps:
                self.tracker.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish the run summary to every tracker and the console (last snapshot at the final step)."""
        if self.tracker is None or not state.is_world_process_zero:
            return
        self.summary = self.tracker.finish(step=int(state.global_step))
        if self._shared_writer is not None:
            # The TensorBoardCallback closed its writer before this hook; the summary reopened it.
            callback, writer = self._shared_writer
            if getattr(callback, "tb_writer", None) is not writer:
                writer.close()
            self._shared_writer = None

    # ------------------------------------------------------------------ trackers
    def _tracker_publishers(self, args: Any, heatmaps: Sequence[str] = ("alpha", "stable_rank")
                            ) -> list[Publisher]:
        """One native publisher per tracker of ``report_to`` that has none among ``publishers``,
        drawing the ``heatmaps`` metrics."""
        wanted = _names(self.report_to if self.report_to is not None else getattr(args, "report_to", None))
        explicit = {getattr(p, "name", None) for p in self.publishers}
        unsupported = [name for name in wanted if name not in (*NATIVE_TRACKERS, *NOT_TRACKERS)]
        if unsupported:
            warnings.warn(f"spectral-plugins: no spectral publisher for report_to {unsupported}; pass "
                          "SpectralCallback(publishers=[...]) to reach them", RuntimeWarning, stacklevel=3)
        factories = {"tensorboard": self._tensorboard_publisher, "mlflow": self._mlflow_publisher,
                     "wandb": self._wandb_publisher}
        publishers: list[Publisher] = []
        for name in (n for n in NATIVE_TRACKERS if n in wanted and n not in explicit):
            try:
                publisher = factories[name](args, tuple(heatmaps))
            except Exception as error:  # noqa: BLE001 - a tracker we cannot reach must not stop training
                warnings.warn(f"spectral-plugins: cannot publish to {name} ({type(error).__name__}: "
                              f"{error}); the other trackers still get every snapshot", RuntimeWarning,
                              stacklevel=3)
                continue
            publishers.append(publisher)
        return publishers

    def _tensorboard_publisher(self, args: Any, heatmaps: tuple[str, ...]) -> Publisher:
        """The Trainer's own ``SummaryWriter`` when reachable, else a ``spectral`` sub-run of its
        logging directory (``$TENSORBOARD_LOGGING_DIR``, else ``output_dir/runs/<time_host>``)."""
        from .tensorboard import TensorBoardPublisher

        callback = next((cb for cb in trainer_callbacks() if _is_a(cb, "TensorBoardCallback")), None)
        writer = getattr(callback, "tb_writer", None)
        if writer is not None:
            self._shared_writer = (callback, writer)
            return TensorBoardPublisher(writer=writer, heatmap_metrics=heatmaps)
        log_dir = getattr(callback, "logging_dir", None) or os.getenv("TENSORBOARD_LOGGING_DIR")
        if log_dir is None:
            from transformers.integrations.integration_utils import default_logdir

            log_dir = os.path.join(args.output_dir, default_logdir())
        log_dir = os.path.join(os.path.expanduser(log_dir), TENSORBOARD_SUBDIR)
        return TensorBoardPublisher(log_dir=log_dir, heatmap_metrics=heatmaps)

    def _mlflow_publisher(self, args: Any, heatmaps: tuple[str, ...]) -> Publisher:
        """The run the Trainer's ``MLflowCallback`` started (the active run), never a new one."""
        import mlflow

        from .mlflow import MlflowPublisher

        if mlflow.active_run() is None:
            raise RuntimeError("report_to names mlflow but no MLflow run is active (is "
                               "DISABLE_MLFLOW_INTEGRATION set?)")
        return MlflowPublisher(heatmap_metrics=heatmaps)

    def _wandb_publisher(self, args: Any, heatmaps: tuple[str, ...]) -> Publisher:
        """The active W&B run (started by the Trainer's ``WandbCallback``)."""
        from .wandb import WandbPublisher, import_wandb

        run = import_wandb().run
        if run is None:
            raise RuntimeError("report_to names wandb but no W&B run is active")
        return WandbPublisher(run=run, heatmap_metrics=heatmaps)

    def _announce(self, publishers: Sequence[Publisher]) -> None:
        """Tell the user once where the panels go (the directory to open, the run id)."""
        where = []
        for publisher in publishers:
            name = getattr(publisher, "name", type(publisher).__name__)
            if hasattr(publisher, "log_dir"):
                where.append(f"{name} (tensorboard --logdir {publisher.log_dir})")
            elif run_id := getattr(publisher, "run_id", None):
                where.append(f"{name} (run {run_id})")
            else:
                where.append(name)
        console().info("spectral-plugins: snapshots every %d optimizer steps to %s", self.every_n_steps,
                       ", ".join(where) or "no tracker (pass publishers=... or set report_to)")

    # ------------------------------------------------------------------ checkpoints (ExportableState)
    def state(self) -> dict[str, Any]:
        """What ``Trainer`` writes into ``trainer_state.json`` at each checkpoint: the JSON-able
        constructor arguments and the tracker's state (history, last step)."""
        args = {k: _jsonable(v) for k, v in {**self.options, "report_to": self.report_to}.items()}
        return {"args": {k: v for k, v in args.items() if v is not _UNSAVABLE},
                "attributes": {"tracker_state": self.tracker_state,
                               "unsaved_options": self._unsaved_options(args)}}

    @property
    def tracker_state(self) -> dict[str, Any] | None:
        """The tracker's :meth:`~spectral_plugins.runtime.tracker.SpectralTracker.state_dict` (None before
        training); setting it restores it when training starts."""
        if self.tracker is not None:
            return self.tracker.state_dict()
        return None if self._pending_state is None else dict(self._pending_state)

    @tracker_state.setter
    def tracker_state(self, value: Mapping[str, Any] | None) -> None:
        self._pending_state = None if value is None else dict(value)

    @property
    def unsaved_options(self) -> list[str]:
        """Options a checkpoint cannot hold (publishers, non-JSON attention options)."""
        return self._unsaved_options({k: _jsonable(v) for k, v in self.options.items()})

    @unsaved_options.setter
    def unsaved_options(self, names: Sequence[str]) -> None:
        # Set by the Trainer on a callback it rebuilt from a checkpoint: those options are missing here.
        self._unrestored = list(names)

    def _unsaved_options(self, args: Mapping[str, Any]) -> list[str]:
        names = [k for k, v in args.items() if v is _UNSAVABLE]
        return (["publishers"] if self.publishers else []) + names

    def _saved_state(self, state: Any) -> dict[str, Any] | None:
        """The tracker state to resume from: none for a fresh run (``global_step == 0``); else the one
        the Trainer set on a rebuilt callback, else the checkpoint's ``stateful_callbacks`` entry."""
        pending, self._pending_state = self._pending_state, None
        if int(state.global_step) == 0:
            return None
        if pending:
            return pending
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            warnings.warn("spectral-plugins: the checkpoint holds several SpectralCallback states; none is "
                          "restored (use one SpectralCallback per Trainer)", RuntimeWarning, stacklevel=3)
            return None
        if isinstance(saved, Mapping):
            return (saved.get("attributes") or {}).get("tracker_state")
        if self.tracker is not None:  # a second train() call on the same callback
            return self.tracker.state_dict()
        return None


# ---------------------------------------------------------------------- helpers
_UNSAVABLE = object()


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists when it survives JSON, else :data:`_UNSAVABLE`."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return _UNSAVABLE


def _names(report_to: str | Sequence[str] | None) -> list[str]:
    """``report_to`` as a list of integration names ("none" -> [], "all" -> the installed ones)."""
    if report_to is None or report_to == "none":
        return []
    if report_to == "all":
        from transformers.integrations import get_available_reporting_integrations

        return list(get_available_reporting_integrations())
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in names if name != "none"]


def _is_a(obj: Any, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(obj).__mro__)


def trainer_callbacks(max_depth: int = 12) -> list[Any]:
    """The callbacks of the ``Trainer`` whose event is being dispatched, or [] outside one.

    ``TrainerCallback`` hooks receive neither the trainer nor its callback handler, so this looks for
    the ``CallbackHandler`` dispatching the current event in the calling frames (a few levels up).
    """
    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler):
                return list(owner.callbacks)
            frame = frame.f_back
    finally:
        del frame
    return []
