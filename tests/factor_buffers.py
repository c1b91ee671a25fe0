"""Random CAME factor buffers (``reference.FactorBuffers``) for the tests of the factor-math
kernels: the CPU kernel (tests/kernels), the CUDA sources built for CPU threads and the GPU
(tests/gpu)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_cautious.kernels import reference
from dist_cautious.kernels.reference import FactorBuffers


def random_factor_buffers(
    runs: Sequence[tuple[int, int, int]], seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> FactorBuffers:
    """Positive factor state and reduced sums of the matrices given as runs ``(R, C, matrices)``,
    in that order; the outputs left empty."""
    gen = torch.Generator(device=device).manual_seed(seed)
    row_counts = torch.cat([torch.full((R * k,), float(C), device=device) for R, C, k in runs])
    col_counts = torch.cat([torch.full((C * k,), float(R), device=device) for R, C, k in runs])
    rows, cols = row_counts.numel(), col_counts.numel()

    def positive(n: int) -> torch.Tensor:
        return torch.rand(n, generator=gen, device=device) * 4 + 1e-3

    buffers = FactorBuffers(
        positive(rows), positive(cols), positive(rows) * row_counts, positive(cols) * col_counts, row_counts, col_counts,
        tuple((R, R * k) for R, _, k in runs), torch.empty(rows, device=device), torch.empty(cols, device=device),
        torch.empty(sum(k for _, _, k in runs), device=device),
    )  # fmt: skip
    return buffers if dtype == torch.float32 else converted(buffers, dtype)


def converted(buffers: FactorBuffers, dtype: torch.dtype) -> FactorBuffers:
    return FactorBuffers(*(v.to(dtype) if isinstance(v, torch.Tensor) else v for v in vars(buffers).values()))


def cloned(buffers: FactorBuffers) -> FactorBuffers:
    return FactorBuffers(*(v.clone() if isinstance(v, torch.Tensor) else v for v in vars(buffers).values()))


def assert_float64_factor_update_runs_the_reference(ops: object, device: str) -> None:
    """A kernel set hands float64 buffers (float64 params' math) to the torch reference ops:
    every buffer, outputs included, bit for bit what those ops make."""
    native = random_factor_buffers([(3, 4, 2), (40, 2, 1)], 4, device=device, dtype=torch.float64)
    expected = cloned(native)
    ops.came_factor_update(native, 0.99)  # type: ignore[attr-defined]
    reference.came_factor_update(expected, 0.99)
    for key, value in vars(native).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(expected, key)), key
