"""The load-time self-check: it crosses the CUDA kernels' chunk and tile boundaries, passes every
kernel set that is right (reference, native CPU, the real CUDA sources run on CPU threads), and
catches a kernel that is off by 0.4% in any one output element (its bounds are fp32 rounding,
about 1e-6 relative, not a fitted tolerance)."""

from __future__ import annotations

import types

import pytest
import torch

from dist_cautious.kernels import reference, selfcheck
from dist_cautious.kernels.layout import FactoredLayout

CPU = torch.device("cpu")
# name -> where the wrong value is written: ("return",) or ("arg", position)
OUTPUTS = {
    "adamw_mask_counts": ("return",),
    "lion_mask_counts": ("return",),
    "adamw_apply": ("arg", 0),
    "lion_apply": ("arg", 0),
    "lion_cautious_finish": ("arg", 1),
    "came_factored_sq_sums": ("arg", 3),
    "came_vector_second_moment": ("arg", 1),
    "came_update_sumsq": ("return",),
    "came_momentum": ("arg", 1),
    "came_apply": ("arg", 0),
    "came_cautious_finish": ("arg", 1),
}


def _off_by(name: str, factor: float) -> types.SimpleNamespace:
    """The reference kernels, with ``name`` writing its largest output element times ``factor``."""
    ops = types.SimpleNamespace(**{k: getattr(reference, k) for k in dir(reference) if not k.startswith("_")})
    correct = getattr(reference, name)
    where = OUTPUTS[name]

    def nudge(tensor: torch.Tensor) -> None:
        flat = tensor.view(-1)
        flat[flat.abs().argmax()] *= factor

    def wrong(*args, **kwargs):
        result = correct(*args, **kwargs)
        if where[0] == "return":
            result = result.clone()
            nudge(result)
        else:
            nudge(args[where[1]][0])
        return result

    setattr(ops, name, wrong)
    # the split phases call the plain functions of the same namespace in the reference module;
    # route them through the namespace so a wrong phase is the one checked
    if name == "came_momentum":
        ops.came_cautious_begin = lambda *a, **k: (wrong(*a, **k), None)
    return ops


def test_cases_cross_the_cuda_boundaries() -> None:
    """More than one 65536-element chunk; fragments over two row tiles (64 rows at 32 lanes) and
    two column tiles (128 columns), cut mid-row; and two matrices in one tile."""
    assert max(selfcheck.CHUNK_CROSSING) > 65536 and max(selfcheck.CHUNK_CROSSING) % 256 != 0
    big = FactoredLayout(*selfcheck.FACTORED[0])
    assert big.cols > 128 and len(big.partial_rows) == 2
    rows_touched = (big.end - 1) // big.cols - big.start // big.cols + 1
    assert rows_touched > 64
    small = FactoredLayout(*selfcheck.FACTORED[1])
    assert small.start // (small.rows * small.cols) != (small.end - 1) // (small.rows * small.cols)


def test_reference_and_native_cpu_pass() -> None:
    from dist_cautious.kernels import cpu_ops

    selfcheck.verify(reference, CPU)
    selfcheck.verify(cpu_ops.load(), CPU)


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_an_error_of_0_4_percent_is_caught(name: str) -> None:
    with pytest.raises(RuntimeError, match=name.replace("_begin", "")):
        selfcheck.verify(_off_by(name, 1.004), CPU)


@pytest.mark.cuda_emulated
def test_the_cuda_sources_run_on_cpu_pass() -> None:
    from dist_cautious.kernels.cuda_ops import CudaOps
    from tests.gpu.cuda_on_cpu.build import load

    selfcheck.verify(CudaOps(load(), device_type="cpu").namespace(), CPU)
