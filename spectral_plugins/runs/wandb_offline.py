"""Read an offline W&B run back from its files: history, summary, config, metric definitions, media.

``wandb.init(mode="offline")`` writes ``<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``, a
record log of protobuf records, and no ``wandb-summary.json``. wandb 0.31 no longer ships a reader
for it (``wandb.sdk.internal.datastore`` is gone), so this module decodes the records itself with
``wandb.proto``::

    from spectral_plugins.runs.wandb_offline import find_wandb_offline_run, read_wandb_offline_run

    run = read_wandb_offline_run(find_wandb_offline_run("demo_runs"))
    run.series("spectral_alpha/L01_q", step_key="spectral/step")   # [(step, value), ...]
    run.summary["spectral_run/wave_speed_qk"]

``spectral-plugins compare`` and ``report`` read offline run folders with it; the tests read back
everything the W&B publisher writes with it. ``wandb`` is imported only to decode the records.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # The protobuf module is generated at import time, so mypy cannot see its classes.
    from wandb.proto.wandb_internal_pb2 import Record  # type: ignore[attr-defined]

__all__ = [
    "WandbMetricDefinition", "WandbOfflineRun", "iter_wandb_records", "wait_for_wandb_exit",
    "read_wandb_offline_run", "find_wandb_offline_run",
]

# The ``.wandb`` file is a LevelDB log (github.com/google/leveldb/blob/main/doc/log_format.md)
# behind a 7-byte file header ``<4sHB``: ident ":W&B", magic 0xBEE1, version 0. The log is cut
# into 32 KiB blocks; each chunk has a 7-byte header ``<IHB``: checksum, data length, chunk type.
# Unlike LevelDB the checksum is plain zlib CRC-32 (not masked CRC-32C) of the type byte followed
# by the data. A block tail shorter than a chunk header is zero padding.
_WANDB_IDENT = b":W&B"
_WANDB_MAGIC = 0xBEE1
_WANDB_VERSIONS = frozenset({0})
_HEADER = struct.Struct("<IHB")
_FILE_HEADER = struct.Struct("<4sHB")
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_SUMMARY_OPTIONS = ("min", "max", "mean", "best", "last", "none", "copy", "first")


@dataclass(frozen=True)
class WandbMetricDefinition:
    """One ``run.define_metric`` call as recorded in the run's ``metric`` record.

    ``name`` is set for exact names, ``glob_name`` for patterns (``"train/*"``); ``summary`` lists
    the requested summary options (``("min",)`` for ``summary="min"``); ``goal`` is
    ``"minimize"``/``"maximize"`` or ``""`` (wandb 0.31's ``define_metric`` no longer sets it).
    """

    name: str
    glob_name: str
    step_metric: str
    summary: tuple[str, ...]
    goal: str
    hidden: bool
    step_sync: bool


@dataclass(frozen=True)
class WandbOfflineRun:
    """What an offline W&B run wrote, rebuilt from its ``run-*.wandb`` record log.

    ``history`` has one dict per ``run.log`` row that W&B kept (rows dropped for a
    decreasing ``step=`` are absent), including W&B's own ``_step``, ``_runtime`` and
    ``_timestamp``. Nested dicts are rebuilt from W&B's nested keys, so media values are the dicts
    W&B writes (``{"_type": "image-file", "path": ..., ...}``). ``summary`` and ``config`` are the
    final values after every update/remove (``config["_wandb"]`` is W&B's own entry). ``files``
    lists files below ``<run_dir>/files/media`` as POSIX paths relative to ``<run_dir>/files``,
    the form media dicts use in ``"path"``. ``exit_code`` is ``None`` until the ``exit`` record
    is written; ``records`` are all decoded records, for assertions on anything else.
    """

    run_dir: Path
    run_id: str
    project: str
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]
    metric_definitions: list[WandbMetricDefinition]
    files: list[str]
    exit_code: int | None = None
    records: list[Record] = field(default_factory=list, repr=False)

    def series(self, key: str, step_key: str = "_step") -> list[tuple[Any, Any]]:
        """Return ``(row[step_key], row[key])`` for every history row that has both keys."""
        return [(row[step_key], row[key]) for row in self.history if key in row and step_key in row]


def _iter_chunks(data: bytes, path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(chunk type, chunk data)`` after the file header, checking every checksum."""
    offset = _FILE_HEADER.size
    while offset < len(data):
        block_left = _BLOCK_LEN - offset % _BLOCK_LEN
        if block_left < _HEADER.size:
            offset += block_left  # zero-filled block trailer
            continue
        if offset + _HEADER.size > len(data):
            return
        checksum, length, kind = _HEADER.unpack_from(data, offset)
        if kind == 0 and length == 0 and checksum == 0:
            offset += block_left  # zero padding up to the next block
            yield 0, b""
            continue
        start, offset = offset + _HEADER.size, offset + _HEADER.size + length
        if offset > len(data):
            return
        chunk = data[start:offset]
        if zlib.crc32(chunk, zlib.crc32(bytes((kind,)))) != checksum:
            raise ValueError(f"{path}: checksum mismatch in chunk at {start - _HEADER.size}")
        yield kind, chunk


def iter_wandb_records(path: Path) -> Iterator[Record]:
    """Yield every ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in write order.

    Raises ``ValueError`` on a bad file header, a checksum mismatch or a broken chunk sequence.
    A record cut short at the end of the file (a run still being written) ends the iteration.
    """
    from wandb.proto.wandb_internal_pb2 import Record  # type: ignore[attr-defined]  # generated

    data = Path(path).read_bytes()
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _WANDB_IDENT or magic != _WANDB_MAGIC or version not in _WANDB_VERSIONS:
        raise ValueError(f"{path}: not a W&B record log (header {ident!r}, {magic:#x}, {version})")
    pending: bytes | None = None
    for kind, chunk in _iter_chunks(data, path):
        if kind in (_FULL, _FIRST) and pending is None:
            pending = chunk
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
        elif kind != 0 or pending is not None:
            raise ValueError(f"{path}: chunk of type {kind} out of sequence")
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(pending)
            pending = None
            yield record


def _item_path(item: Any) -> list[str]:
    """Key path of a history/summary/config item: ``nested_key`` if set, else ``[key]``."""
    return list(item.nested_key) or [item.key]


def _item_value(item: Any) -> Any:
    """Decode a history/summary/config item value (JSON, or a typed field where W&B used one)."""
    typed = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if typed == "none":
        return None
    if typed == "json":
        return json.loads(item.json)
    if typed is not None:
        return getattr(item, typed)
    return json.loads(item.value_json)  # json accepts W&B's bare NaN / Infinity


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def _remove_path(target: dict[str, Any], path: list[str]) -> None:
    node: Any = target
    for key in path[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


def _apply(target: dict[str, Any], updates: Any, removes: Any = ()) -> None:
    for item in updates:
        _set_path(target, _item_path(item), _item_value(item))
    for item in removes:
        _remove_path(target, _item_path(item))


def _metric_definition(metric: Any) -> WandbMetricDefinition:
    return WandbMetricDefinition(
        name=metric.name,
        glob_name=metric.glob_name,
        step_metric=metric.step_metric,
        summary=tuple(opt for opt in _SUMMARY_OPTIONS if getattr(metric.summary, opt)),
        goal={1: "minimize", 2: "maximize"}.get(int(metric.goal), ""),
        hidden=metric.options.hidden,
        step_sync=metric.options.step_sync,
    )


def _wandb_log(run_dir: Path) -> Path:
    logs = sorted(run_dir.glob("run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {run_dir}, found {len(logs)}")
    return logs[0]


def wait_for_wandb_exit(run_dir: Path, timeout_s: float = 10.0) -> list[Record]:
    """Return the run's records once its ``exit`` record is on disk.

    ``run.finish()`` returns before W&B's service has written the records: right after it the
    file may hold only its 7-byte header (seen in about one run in three; complete within tens of
    milliseconds). Raises ``TimeoutError`` if no ``exit`` record appears within ``timeout_s``.
    """
    log = _wandb_log(Path(run_dir))
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(iter_wandb_records(log))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{log}: no exit record after {timeout_s} s ({len(records)} records); "
                "was run.finish() called?"
            )
        time.sleep(0.02)


def read_wandb_offline_run(run_dir: Path, wait_for_exit_s: float | None = 10.0) -> WandbOfflineRun:
    """Rebuild history, summary, config, metric definitions and media files of an offline run.

    ``run_dir`` is a ``.../wandb/offline-run-*`` directory holding one ``run-*.wandb`` file. By
    default this waits for the run's ``exit`` record (see :func:`wait_for_wandb_exit`); pass
    ``wait_for_exit_s=None`` to read whatever a live run has written so far.
    """
    run_dir = Path(run_dir)
    if wait_for_exit_s is None:
        records = list(iter_wandb_records(_wandb_log(run_dir)))
    else:
        records = wait_for_wandb_exit(run_dir, wait_for_exit_s)
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    definitions: list[WandbMetricDefinition] = []
    run_id = project = ""
    exit_code = None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, project = record.run.run_id, record.run.project
            _apply(config, record.run.config.update, record.run.config.remove)
            _apply(summary, record.run.summary.update, record.run.summary.remove)
        elif kind == "history":
            history.append({})
            _apply(history[-1], record.history.item)
        elif kind == "summary":
            _apply(summary, record.summary.update, record.summary.remove)
        elif kind == "config":
            _apply(config, record.config.update, record.config.remove)
        elif kind == "metric":
            definitions.append(_metric_definition(record.metric))
        elif kind == "exit":
            exit_code = record.exit.exit_code
    files = run_dir / "files"
    media = sorted(p.relative_to(files).as_posix() for p in files.glob("media/**/*") if p.is_file())
    return WandbOfflineRun(
        run_dir, run_id, project, history, summary, config, definitions, media, exit_code, records
    )


def _wandb_start_key(run_dir: Path) -> tuple[str, int]:
    """Sort key: the start time in the name (``offline-run-YYYYMMDD_HHMMSS-<id>``), then ns."""
    stamp = run_dir.name.removeprefix("offline-run-").split("-", 1)[0]
    for record in iter_wandb_records(_wandb_log(run_dir)):
        if record.WhichOneof("record_type") == "run":
            start = record.run.start_time
            return stamp, start.seconds * 10**9 + start.nanos
    return stamp, 0


def find_wandb_offline_run(root: Path) -> Path:
    """Return the ``offline-run-*`` directory below ``root``, the latest started if several.

    Each ``wandb/`` directory's ``latest-run`` symlink (W&B's own pointer to its newest run) is
    preferred; among several ``wandb/`` directories the run started last wins. Raises
    ``FileNotFoundError`` if there is none.
    """
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        runs = [
            Path(dirpath) / name
            for name in dirnames
            if name.startswith("offline-run-")
            and not (Path(dirpath) / name).is_symlink()
            and any((Path(dirpath) / name).glob("run-*.wandb"))
        ]
        latest = Path(dirpath) / "latest-run"
        if latest.is_symlink() and latest.resolve() in {run.resolve() for run in runs}:
            runs = [Path(dirpath) / latest.resolve().name]
        found += runs
    if not found:
        raise FileNotFoundError(f"no wandb offline-run-* directory with a run-*.wandb below {root}")
    return max(found, key=_wandb_start_key)
