"""Loading saved weights for the command line: a state dict file or a Hugging Face model directory.

A file that cannot be read (empty, truncated, not a checkpoint) raises :class:`CheckpointError`, whose
message is one line saying what was wrong and what to pass instead; :func:`skipped_tensors` lists the
tensors of a state dict that are not analysed, and why.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .model_map import ModelMap, map_state_dict, skip_reason

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
# Lightning / plain training checkpoints nest the weights under one of these keys.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
PASS_INSTEAD = ("pass a state dict saved with torch.save (.pt/.pth/.bin/.ckpt), a .safetensors file, or a "
                "Hugging Face model directory (config.json + weights)")


class CheckpointError(ValueError):
    """Saved weights that cannot be read; the message is one line: what was wrong, what to pass."""


@dataclass(frozen=True)
class SkippedTensors:
    """The tensors of a state dict that are not analysed, by reason (names in file order).

    Attributes:
        not_float: ``(name, dtype)`` of integer, bool and complex tensors (ids, masks, counters).
        convolution: ``(name, shape)`` of weights with 3 or more dimensions.
        vector: ``(name, shape)`` of 2-D weights with a side of 1 (1 x n, n x 1).
        one_d: how many 1-D or scalar tensors (biases, norm scales) there are.
    """

    not_float: tuple[tuple[str, str], ...] = ()
    convolution: tuple[tuple[str, tuple[int, ...]], ...] = ()
    vector: tuple[tuple[str, tuple[int, ...]], ...] = ()
    one_d: int = 0

    def lines(self, limit: int = 8) -> list[str]:
        """One line per reason that occurred, naming up to ``limit`` tensors each."""
        def names(items: tuple[tuple[str, Any], ...], show: Callable[[Any], str]) -> str:
            listed = ", ".join(f"{name} {show(detail)}" for name, detail in items[:limit])
            return listed + (f", ... and {len(items) - limit} more" if len(items) > limit else "")

        shape = "x".join
        out = []
        if self.not_float:
            out.append(f"skipped {len(self.not_float)} tensor(s) that are not floating point: "
                       f"{names(self.not_float, lambda dtype: f'({dtype})')}")
        if self.convolution:
            out.append(f"skipped {len(self.convolution)} convolution weight(s) (3-D or more; spectra "
                       f"are of 2-D matrices): {names(self.convolution, lambda s: shape(map(str, s)))}")
        if self.vector:
            out.append(f"skipped {len(self.vector)} vector-shaped weight(s) (1 x n or n x 1, no "
                       f"spectrum): {names(self.vector, lambda s: shape(map(str, s)))}")
        if self.one_d:
            out.append(f"skipped {self.one_d} 1-D tensor(s) (biases, norm scales)")
        return out


def skipped_tensors(state: Mapping[str, torch.Tensor]) -> SkippedTensors:
    """What :func:`~spectral_plugins.core.model_map.map_state_dict` leaves out of ``state``, and why
    (:func:`~spectral_plugins.core.model_map.skip_reason`)."""
    found: dict[str, list[tuple[str, Any]]] = {"not floating point": [], "convolution": [], "vector": [],
                                                "1-D": []}
    for name, tensor in state.items():
        reason = skip_reason(tensor, name)
        if reason is not None:
            detail = str(tensor.dtype).removeprefix("torch.") if reason == "not floating point" \
                else tuple(tensor.shape)
            found[reason].append((name, detail))
    return SkippedTensors(tuple(found["not floating point"]), tuple(found["convolution"]),
                          tuple(found["vector"]), len(found["1-D"]))


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and config from a ``.pt``/``.pth``/``.bin``/``.ckpt`` file (read with
    ``weights_only=True``), a ``.safetensors`` file, or a Hugging Face model directory
    (``config.json`` + weights, sharded weights included).

    Returns:
        ``(state_dict, config)``; ``config`` is ``{}`` when none is found beside a single file.

    Raises:
        FileNotFoundError: the path does not exist or the directory holds no weights.
        CheckpointError: a file is empty, truncated, not a checkpoint, or holds no tensors (a
            ValueError whose message is one line).
        ModuleNotFoundError: a .safetensors file without the safetensors package.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {PASS_INSTEAD}")
    if path.is_dir():
        config = _read_config(path / "config.json")
        files = _weight_files(path)
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(_read_file(file))
        return state, config
    return _read_file(path), _read_config(path.parent / "config.json")


def load_model_map(path: str | Path, **map_options: Any) -> tuple[ModelMap, SkippedTensors]:
    """:func:`load_state_dict` followed by :func:`~spectral_plugins.map_state_dict`; also what the
    map leaves out (:func:`skipped_tensors`)."""
    state, config = load_state_dict(path)
    return map_state_dict(state, config, **map_options), skipped_tensors(state)


def _weight_files(directory: Path) -> list[Path]:
    for name in _WEIGHT_FILES:
        if (directory / name).exists():
            return [directory / name]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointError(f"{index} is not a shard index (no readable weight_map: "
                                      f"{_brief(error)}); {PASS_INSTEAD}") from None
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) missing from {directory}: {missing[:3]}; "
                                        "copy every shard next to the index")
            return [directory / shard for shard in shards]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not found:
        raise FileNotFoundError(f"{directory} holds no weights (looked for {', '.join(_WEIGHT_FILES)}, "
                                f"*.safetensors, *.bin); {PASS_INSTEAD}")
    return found


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; was the save interrupted?); {PASS_INSTEAD}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ModuleNotFoundError(
                "reading .safetensors needs the safetensors package: pip install 'spectral-plugins[hf]'"
            ) from error
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError (and others)
            raise CheckpointError(f"{path} is not a readable .safetensors file ({_brief(error)}; "
                                  f"truncated or not safetensors?); {PASS_INSTEAD}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Never retried with weights_only=False: unpickling arbitrary objects can run code.
        raise CheckpointError(f"{path} is not a torch.save file of tensors (torch.load with "
                              "weights_only=True refused it: another format, corrupted bytes, or Python "
                              f"objects besides tensors); {PASS_INSTEAD} (from a checkpoint you trust, "
                              "torch.save just its state_dict)") from None
    except Exception as error:  # EOFError, RuntimeError, KeyError ... from torch.load
        raise CheckpointError(f"{path} is not a readable torch.save file ({_brief(error)}; truncated or "
                              f"corrupted?); {PASS_INSTEAD}") from None
    state = _find_tensors(loaded)
    if not state:
        raise CheckpointError(f"{path} holds no tensors; expected a state_dict (or a checkpoint containing "
                              f"one under {' / '.join(_NESTED_KEYS)})")
    return state


def _brief(error: BaseException, width: int = 120) -> str:
    """``Type: first line of the message``, cut to ``width`` characters (the CLI prints one line)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= width else text[:width - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _find_tensors(loaded: Any) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return {_strip_prefix(k): v for k, v in tensors.items()}
        for key in _NESTED_KEYS:
            if key in loaded:
                return _find_tensors(loaded[key])
    return {}


def _strip_prefix(key: str) -> str:
    # DDP / torch.compile wrappers prefix every name.
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({_brief(error)}); fix or remove it (it only "
                              "supplies head counts and the model type)") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds {type(config).__name__}, not a JSON object; fix or remove it")
    return config
