"""Loading saved weights for the command line: a state dict file or a Hugging Face model directory."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .model_map import ModelMap, map_state_dict

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
# Lightning / plain training checkpoints nest the weights under one of these keys.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and config from a ``.pt``/``.pth``/``.bin``/``.ckpt`` file (read with
    ``weights_only=True``), a ``.safetensors`` file, or a Hugging Face model directory
    (``config.json`` + weights, sharded weights included).

    Returns:
        ``(state_dict, config)``; ``config`` is ``{}`` when none is found beside a single file.

    Raises:
        FileNotFoundError: the path does not exist or the directory holds no weights.
        ValueError: the file holds no tensors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a .pt/.safetensors file or a model directory")
    if path.is_dir():
        config = _read_config(path / "config.json")
        files = _weight_files(path)
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(_read_file(file))
        return state, config
    return _read_file(path), _read_config(path.parent / "config.json")


def load_model_map(path: str | Path, **map_options: Any) -> ModelMap:
    """:func:`load_state_dict` followed by :func:`~spectral_plugins.map_state_dict`."""
    state, config = load_state_dict(path)
    return map_state_dict(state, config, **map_options)


def _weight_files(directory: Path) -> list[Path]:
    for name in _WEIGHT_FILES:
        if (directory / name).exists():
            return [directory / name]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / shard for shard in shards]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not found:
        raise FileNotFoundError(f"{directory} holds no weights (looked for {', '.join(_WEIGHT_FILES)})")
    return found


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ModuleNotFoundError(
                "reading .safetensors needs the safetensors package: pip install 'spectral-plugins[hf]'"
            ) from error
        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = _find_tensors(loaded)
    if not state:
        raise ValueError(f"{path} holds no tensors; expected a state_dict (or a checkpoint containing one)")
    return state


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
    return json.loads(path.read_text()) if path.exists() else {}
