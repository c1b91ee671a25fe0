"""A native kernel set proves itself against the reference path before it is used.

Built kernels can be wrong in ways a build cannot see (a miscompile, a GPU generation nobody
tested). ``verify`` runs every kernel once on small odd-sized inputs, a mid-row CAME fragment
included, and compares with ``kernels.reference``; ``kernels.ops_for`` uses the native set only
if this passes. Costs milliseconds, once per process and device type.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dist_cautious.kernels import reference
from dist_cautious.kernels.layout import FactoredLayout
from dist_cautious.kernels.reference import CameFactors

# Summation order and fused multiply-adds differ by a few fp32 ulps on these sizes.
RTOL, ATOL = 1e-5, 1e-6


def _close(name: str, ours: Tensor, expected: Tensor) -> None:
    if not torch.allclose(ours.float().cpu(), expected.float().cpu(), rtol=RTOL, atol=ATOL):
        worst = (ours.float().cpu() - expected.float().cpu()).abs().max().item()
        raise RuntimeError(f"kernel self-check failed in {name}: max abs difference {worst:.3g}")


def _twins(device: torch.device, *sizes: int, positive: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(sum(sizes))
    made = [torch.randn(size, generator=generator) for size in sizes]
    if positive:
        made = [t.abs() + 0.1 for t in made]
    return [t.to(device).clone() for t in made], [t.to(device).clone() for t in made]


def _check_adamw_lion(ops: Any, device: torch.device) -> None:
    sizes = (37, 5, 129)
    grads, _ = _twins(device, *sizes)
    for scales in (None, torch.tensor([1.5, 2.0, 1.0], device=device)):
        params, params_ref = _twins(device, *sizes)
        ms, ms_ref = _twins(device, *sizes)
        vs, vs_ref = _twins(device, *sizes, positive=True)
        _close("adamw_mask_counts", ops.adamw_mask_counts(grads, ms, 0.9), reference.adamw_mask_counts(grads, ms_ref, 0.9))
        kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scales=scales)
        ops.adamw_apply(params, grads, ms, vs, [3, 3, 1], **kwargs)
        reference.adamw_apply(params_ref, grads, ms_ref, vs_ref, [3, 3, 1], **kwargs)
        for name, ours, expected in (("param", params, params_ref), ("exp_avg", ms, ms_ref), ("exp_avg_sq", vs, vs_ref)):
            for a, b in zip(ours, expected):
                _close(f"adamw_apply {name}", a, b)
        _close("lion_mask_counts", ops.lion_mask_counts(grads, ms, 0.9), reference.lion_mask_counts(grads, ms_ref, 0.9))
        lion_kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
        ops.lion_apply(params, grads, ms, **lion_kwargs)
        reference.lion_apply(params_ref, grads, ms_ref, **lion_kwargs)
        for a, b in zip(params + ms, params_ref + ms_ref):
            _close("lion_apply", a, b)
    scales = torch.tensor([1.5, 2.0, 1.0], device=device)
    params, params_ref = _twins(device, *sizes)
    ms, ms_ref = _twins(device, *sizes)
    lion_kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
    counts, pending = ops.lion_cautious_begin(params, grads, ms, beta1=0.9, beta2=0.99)
    _close("lion_cautious_begin counts", counts, reference.lion_mask_counts(grads, ms_ref, 0.9))
    ops.lion_cautious_finish(pending, params, grads, ms, **lion_kwargs)
    reference.lion_apply(params_ref, grads, ms_ref, **lion_kwargs)
    for a, b in zip(params + ms, params_ref + ms_ref):
        _close("lion_cautious_finish", a, b)


def _check_came(ops: Any, device: torch.device) -> None:
    shape, start, end = (2, 5, 7), 9, 61  # cut mid-row, across the two matrices
    layout = FactoredLayout(shape, start, end)
    (grad, vector_grad), _ = _twins(device, end - start, 11)
    rows = torch.zeros(layout.num_row_factors, device=device)
    cols = torch.zeros(layout.num_col_factors, device=device)
    rows_ref, cols_ref = rows.clone(), cols.clone()
    ops.came_factored_sq_sums([grad], [layout], 1e-30, [rows], [cols])
    reference.came_factored_sq_sums([grad], [layout], 1e-30, [rows_ref], [cols_ref])
    _close("came_factored_sq_sums rows", rows, rows_ref)
    _close("came_factored_sq_sums cols", cols, cols_ref)
    (v,), (v_ref,) = _twins(device, 11, positive=True)
    ops.came_vector_second_moment([vector_grad], [v], 0.999, 1e-30)
    reference.came_vector_second_moment([vector_grad], [v_ref], 0.999, 1e-30)
    _close("came_vector_second_moment", v, v_ref)
    (row_f, col_f), _ = _twins(device, layout.num_row_factors, layout.num_col_factors, positive=True)
    factors = [CameFactors(layout, row_f, col_f), CameFactors(elementwise=v)]
    grads = [grad, vector_grad]
    _close("came_update_sumsq", ops.came_update_sumsq(grads, factors), reference.came_update_sumsq(grads, factors))
    ms, ms_ref = _twins(device, end - start, 11)
    res = [torch.zeros(layout.num_row_factors, device=device), None], [torch.zeros(layout.num_col_factors, device=device), None]
    res_ref = [t.clone() if t is not None else None for t in res[0]], [t.clone() if t is not None else None for t in res[1]]
    divisors = torch.tensor([1.7, 1.0], device=device)
    counts = ops.came_momentum(grads, ms, factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=res[0], res_col_sums=res[1])
    counts_ref = reference.came_momentum(grads, ms_ref, factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=res_ref[0], res_col_sums=res_ref[1])
    _close("came_momentum counts", counts, counts_ref)
    for a, b in zip(ms + [res[0][0], res[1][0]], ms_ref + [res_ref[0][0], res_ref[1][0]]):
        _close("came_momentum", a, b)
    kept, _ = _twins(device, end - start, 11)  # the same start values as ms
    kept_res = [torch.zeros(layout.num_row_factors, device=device), None], [torch.zeros(layout.num_col_factors, device=device), None]
    kept_counts, pending = ops.came_cautious_begin(grads, kept, factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=kept_res[0], res_col_sums=kept_res[1])
    _close("came_cautious_begin counts", kept_counts, counts_ref)
    params, params_ref = _twins(device, end - start, 11)
    kept_scales = torch.tensor([1.25, 3.0], device=device)
    ops.came_cautious_finish(pending, params, grads, kept, [CameFactors(layout, row_f, col_f), CameFactors()], lr=1e-2, weight_decay=0.1, scales=kept_scales)
    reference.came_apply(params_ref, grads, ms_ref, [CameFactors(layout, row_f, col_f), CameFactors()], lr=1e-2, weight_decay=0.1, scales=kept_scales)
    for a, b in zip(params + kept, params_ref + ms_ref):
        _close("came_cautious_finish", a, b)
    params, params_ref = _twins(device, end - start, 11)
    confidence = [CameFactors(layout, row_f, col_f), CameFactors()]
    for scales in (None, torch.tensor([1.25, 3.0], device=device)):
        ops.came_apply(params, grads, ms, confidence, lr=1e-2, weight_decay=0.1, scales=scales)
        reference.came_apply(params_ref, grads, ms_ref, confidence, lr=1e-2, weight_decay=0.1, scales=scales)
        for a, b in zip(params, params_ref):
            _close("came_apply", a, b)


def verify(ops: Any, device: torch.device) -> None:
    """Raise ``RuntimeError`` naming the first kernel that disagrees with the reference path."""
    _check_adamw_lion(ops, device)
    _check_came(ops, device)
