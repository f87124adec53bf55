"""Bundled demo text: the Python standard library's own source files, read locally (no download).

The vocabulary is fixed (the 100 characters of :data:`string.printable`), so a model trained on one
Python version reads text from another; any other character maps to a space.
"""

from __future__ import annotations

import string
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

VOCAB: str = string.printable
UNKNOWN: str = " "
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
# Code point -> id for the ASCII range; every other code point is unknown.
_ASCII = np.full(128, _INDEX[UNKNOWN], dtype=np.int64)
for _ch, _i in _INDEX.items():
    _ASCII[ord(_ch)] = _i


def stdlib_dir() -> Path:
    """Where this interpreter's standard library sources live."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_text(max_chars: int = 2_000_000, root: Path | None = None) -> str:
    """Concatenated ``*.py`` files of the standard library's top level, in name order, up to
    ``max_chars`` characters (deterministic for a given Python version).

    Raises:
        FileNotFoundError: no Python source file was found (a stripped interpreter).
    """
    root = stdlib_dir() if root is None else Path(root)
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise FileNotFoundError(f"no Python sources in {root}; the demo needs the standard library sources")
    return "".join(parts)[:max_chars]


DOCSTRING_MODULES = ("json", "os", "collections", "functools", "itertools", "re", "string", "textwrap",
                     "pathlib", "argparse", "datetime", "heapq", "bisect", "shutil", "csv", "random",
                     "statistics", "inspect")


def stdlib_docstrings(count: int = 96, max_chars: int = 400, modules: tuple[str, ...] = DOCSTRING_MODULES
                      ) -> list[str]:
    """The first ``max_chars`` characters of the docstrings (at least 80 characters long) of public
    callables of some standard-library modules, in a fixed order, without repeats: technical prose
    with code, a source of text unlike plain English sentences (held-out tests of attention bounds)."""
    import importlib
    import inspect

    out: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            doc = inspect.getdoc(obj) if not attr.startswith("_") and callable(obj) else None
            if doc and len(doc) >= 80 and doc[:max_chars] not in out:
                out.append(doc[:max_chars])
    return out[:count]


def encode(text: str) -> torch.Tensor:
    """Character ids (int64), unknown characters as :data:`UNKNOWN`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    ids = np.where(codes < 128, _ASCII[np.minimum(codes, 127)], _INDEX[UNKNOWN])
    return torch.from_numpy(ids.astype(np.int64))


def decode(ids: torch.Tensor | list[int]) -> str:
    """Text of character ids."""
    return "".join(VOCAB[int(i)] for i in ids)


class CharWindows(Dataset):
    """Random windows of a character stream: item i is ``(x, y)`` with ``y`` = ``x`` shifted by one.

    Window starts are drawn once from ``seed``, so an epoch is reproducible.

    Args:
        ids: the encoded text (1-D int64).
        block_size: window length.
        num_samples: windows per epoch.
        seed: seed of the window starts.
    """

    def __init__(self, ids: torch.Tensor, block_size: int, num_samples: int, seed: int = 0) -> None:
        if ids.numel() <= block_size + 1:
            raise ValueError(f"text of {ids.numel()} characters is too short for block_size={block_size}")
        self.ids = ids
        self.block_size = block_size
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, ids.numel() - block_size - 1, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return int(self.starts.numel())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index])
        chunk = self.ids[start:start + self.block_size + 1]
        return chunk[:-1], chunk[1:]
