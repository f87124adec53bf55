"""The spectral engine: eigenvalue spectra of every mapped matrix, batched, on the weights' device."""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .metrics import WEIGHTWATCHER_EIGENVALUE_THRESHOLD as _FIT_THRESHOLD
from .metrics import PowerLawFit, alpha_weighted, effective_rank, fit_alpha
from .model_map import MatrixRef, ModelMap, map_model
from .snapshot import LayerSpectrum, Snapshot

METHODS = ("auto", "gram", "svd")
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class _Spectra:
    """Eigenvalues of a batch of equal-shape matrices, plus what the metrics need from W itself."""

    refs: tuple[MatrixRef, ...]
    eigenvalues: torch.Tensor  # (batch, k) ascending, clamped at 0, float64 on the CPU
    frobenius_sq: torch.Tensor  # (batch,)
    finite: torch.Tensor  # (batch,) bool
    floor: torch.Tensor  # (batch,) precision floor per matrix


class SpectralEngine:
    """Computes :class:`Snapshot` s; keep one per training run and call :meth:`analyze` each time.

    Args:
        method: "gram" (default via "auto"): eigenvalues of the Gram matrix of the smaller side,
            ``W W^T`` or ``W^T W``, by a symmetric eigensolver; "svd": float64 ``svdvals``.
        device: where to compute (default: where each matrix lives).
        dtype: floating type of the Gram method (default float64 on CPU, float32 on GPU with TF32
            disabled). "svd" always uses float64.
        keep_eigenvalues: store each full spectrum in its :class:`LayerSpectrum`.
        max_batch_bytes: largest stack of equal-shape matrices processed at once.
    """

    def __init__(
        self,
        method: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        keep_eigenvalues: bool = False,
        max_batch_bytes: int = 256 * 2**20,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r}; choose one of {METHODS}")
        self.method = "gram" if method == "auto" else method
        self.device = torch.device(device) if device is not None else None
        if isinstance(dtype, str) and dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={dtype!r}; choose 'float32' or 'float64'")
        self.dtype: torch.dtype | None = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.keep_eigenvalues = keep_eigenvalues
        self.max_batch_bytes = max_batch_bytes
        self._warned_nonfinite: set[str] = set()

    def analyze(
        self,
        model_or_map: nn.Module | ModelMap,
        step: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> Snapshot:
        """Spectra and metrics of every matrix of a model (mapped with defaults) or a model map."""
        model_map = model_or_map if isinstance(model_or_map, ModelMap) else map_model(model_or_map)
        started = time.perf_counter()
        layers: dict[str, LayerSpectrum] = {}
        done = 0
        used_device: torch.device | None = None
        for spectra in self._spectra(model_map.matrices):
            used_device = self.device or spectra.refs[0].device
            for i, ref in enumerate(spectra.refs):
                layers[ref.name] = self._layer(ref, spectra, i)
            done += len(spectra.refs)
            if progress is not None:
                progress(done, len(model_map.matrices))
        self._warn_nonfinite([layer for layer in layers.values() if not layer.finite])
        ordered = tuple(layers[ref.name] for ref in model_map.matrices)
        dtype_name = str(self._compute_dtype(used_device)).removeprefix("torch.")
        return Snapshot(step=step, layers=ordered, method=self.method, dtype=dtype_name,
                        device=str(used_device or "cpu"),
                        seconds=time.perf_counter() - started)

    def eigenvalues(self, ref: MatrixRef) -> np.ndarray:
        """The ascending eigenvalues ``s_i^2`` of one matrix as float64 numpy (for tests, plots)."""
        spectra = next(self._spectra((ref,)))
        return spectra.eigenvalues[0].numpy()

    def _compute_dtype(self, device: torch.device | None) -> torch.dtype:
        if self.method == "svd":
            return torch.float64
        if self.dtype is not None:
            return self.dtype
        target = self.device or device
        return torch.float64 if target is None or target.type == "cpu" else torch.float32

    def _spectra(self, refs: tuple[MatrixRef, ...] | list[MatrixRef]) -> Iterator[_Spectra]:
        """Batches of equal-shape matrices on one device, largest first."""
        groups: dict[tuple[tuple[int, ...], str], list[MatrixRef]] = {}
        for ref in refs:
            groups.setdefault((tuple(sorted(ref.shape)), str(self.device or ref.device)), []).append(ref)
        for (small_large, _), members in sorted(groups.items(), key=lambda kv: -kv[0][0][0] * kv[0][0][1]):
            bytes_each = small_large[0] * small_large[1] * 8
            per_batch = max(1, self.max_batch_bytes // bytes_each)
            for start in range(0, len(members), per_batch):
                yield self._batch_spectra(tuple(members[start:start + per_batch]))

    def _batch_spectra(self, refs: tuple[MatrixRef, ...]) -> _Spectra:
        device = self.device or refs[0].device
        dtype = self._compute_dtype(device)
        # Rows = the smaller side, so the Gram matrix is the small one (spectra ignore transposes).
        mats = [ref.weight() for ref in refs]
        mats = [m if m.shape[0] <= m.shape[1] else m.t() for m in mats]
        stack = torch.empty((len(mats), *mats[0].shape), device=device, dtype=dtype)
        for i, m in enumerate(mats):
            stack[i].copy_(m)  # one conversion copy, straight into the batch
        if self.method == "svd":
            finite = torch.isfinite(stack).flatten(1).all(dim=1)
            if not bool(finite.all()):
                stack[~finite] = 0.0
            frobenius_sq = stack.square().sum(dim=(-2, -1))
            eigenvalues = torch.linalg.svdvals(stack).square().flip(-1)
        else:
            with _exact_matmul(device, dtype):  # only the product: the flag is process-global
                gram = stack @ stack.transpose(-2, -1)
            # NaN/Inf anywhere in row i of W makes diag(W W^T)_i non-finite: checking the small
            # diagonal replaces a full pass over W (measured 8% of a GPT-2 snapshot on CPU).
            diagonal = gram.diagonal(dim1=-2, dim2=-1)
            finite = torch.isfinite(diagonal).all(dim=1)
            if not bool(finite.all()):
                gram[~finite] = 0.0
            frobenius_sq = diagonal.sum(-1)  # trace(W W^T) = ||W||_F^2
            # CPU LAPACK runs batched eigvalsh matrix by matrix without threading (measured
            # ~2x slower than this loop on 2 cores); CUDA batches for real.
            eigenvalues = (torch.stack([torch.linalg.eigvalsh(g) for g in gram]) if device.type == "cpu"
                           else torch.linalg.eigvalsh(gram))
        eigenvalues = eigenvalues.clamp_min(0)
        size = max(stack.shape[-2:])
        floor = torch.finfo(dtype).eps * size * eigenvalues[:, -1]
        return _Spectra(refs, eigenvalues.to("cpu", torch.float64), frobenius_sq.to("cpu", torch.float64),
                        finite.cpu(), floor.to("cpu", torch.float64))

    def _layer(self, ref: MatrixRef, spectra: _Spectra, i: int) -> LayerSpectrum:
        eigenvalues = spectra.eigenvalues[i]
        floor = float(spectra.floor[i])
        finite = bool(spectra.finite[i])
        nan = math.nan
        if not finite or float(eigenvalues[-1]) <= 0:
            fit, values = PowerLawFit.failed(), dict(spectral_norm=nan, frobenius_norm=nan, stable_rank=nan,
                                                     effective_rank=nan, lambda_max=nan)
            if finite:  # an all-zero matrix: norms are 0, the rest undefined
                values.update(spectral_norm=0.0, frobenius_norm=0.0, lambda_max=0.0)
        else:
            lambda_max = float(eigenvalues[-1])
            trusted = torch.where(eigenvalues >= floor, eigenvalues, torch.zeros_like(eigenvalues))
            fit = fit_alpha(eigenvalues, threshold=max(_FIT_THRESHOLD, floor))
            values = dict(
                spectral_norm=math.sqrt(lambda_max),
                frobenius_norm=math.sqrt(float(spectra.frobenius_sq[i])),
                stable_rank=float(spectra.frobenius_sq[i]) / lambda_max,
                effective_rank=float(effective_rank(trusted)),
                lambda_max=lambda_max,
            )
        return LayerSpectrum(
            name=ref.name, key=ref.key, module_name=ref.module_name, depth=ref.depth, role=ref.role,
            stack=ref.stack, expert=ref.expert,
            shape=ref.shape, alpha=fit.alpha, alpha_weighted=alpha_weighted(fit.alpha, values["lambda_max"]),
            xmin=fit.xmin, ks_distance=fit.ks, n_tail=fit.n_tail, sigma_alpha=fit.sigma, finite=finite,
            precision_floor=floor if finite else nan, n_below_floor=int((eigenvalues < floor).sum()),
            eigenvalues=eigenvalues.numpy().copy() if self.keep_eigenvalues else None, **values,
        )

    def _warn_nonfinite(self, layers: list[LayerSpectrum]) -> None:
        new = [layer.name for layer in layers if layer.name not in self._warned_nonfinite]
        if new:
            self._warned_nonfinite.update(new)
            warnings.warn(
                f"spectral-plugins: {len(new)} matrices contain NaN/Inf; their metrics are NaN "
                f"(flag finite=False) and the others are unaffected: {new[:5]}",
                RuntimeWarning,
                stacklevel=3,
            )


_TF32_LOCK = threading.Lock()


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _exact_matmul(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Disable TF32 on CUDA for a float32 Gram product: its 10-bit mantissa would swamp small eigenvalues.

    The flag is process-global: while it is off, float32 matmuls that other threads launch (a training
    loop beside a background snapshot) run without TF32 too. So it is touched only when it is on and
    the product is float32, for the launch of the product alone, under a lock so that engines on two
    threads restore it correctly.
    """
    if device.type != "cuda" or dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    with _TF32_LOCK:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous


def analyze(
    model_or_map: nn.Module | ModelMap,
    method: str = "auto",
    device: str | torch.device | None = None,
    step: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> Snapshot:
    """One-off :class:`Snapshot` of a model or model map (see :class:`SpectralEngine`)."""
    return SpectralEngine(method=method, device=device, dtype=dtype).analyze(model_or_map, step=step)
