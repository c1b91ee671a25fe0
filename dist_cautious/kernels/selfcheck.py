"""A native kernel set proves itself against the reference path before it is used.

Built kernels can be wrong in ways a build cannot see (a miscompile, a GPU generation nobody
tested). ``verify`` runs every kernel once and compares with ``kernels.reference``;
``kernels.ops_for`` uses the native set only if this passes. It runs at every process start
(once per device type), so it is small: tens of milliseconds on a CPU.

The cases cross the boundaries of the shipped CUDA kernels, where a wrong index shows first: an
elementwise tensor of more than one 65536-element chunk (ending mid-ILP-pass) next to tensors
shorter than a block; a factored fragment cut mid-row at both ends across two row tiles and two
column tiles at 32 lanes; one cut mid-row across two matrices in a single tile at 2 lanes.

Bounds come from fp32 rounding, not fitted constants. With ``u = 2**-24``: an elementwise result
that takes up to 4 roundings on each side (one side may fuse a multiply-add the other does not)
is within ``8u`` of the magnitudes of its terms, ``16u`` where the GPU's ``rsqrtf`` (2 ulp) is
used; a sum of ``k`` positive terms in two orders is within ``2 k u`` of the sum, plus its terms'
own error. Mask counts must agree exactly. A kernel off by 0.4% fails all of these by orders of
magnitude.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from dist_cautious.kernels import reference
from dist_cautious.kernels.layout import FactoredLayout
from dist_cautious.kernels.reference import CameFactors

U = 2.0**-24
ELEMENTWISE_ULPS = 8.0
RSQRT_ULPS = 16.0
ELEM_SIZES = (37, 5, 129)  # shorter than a block, odd
# One chunk of the CUDA kernels and 77 elements more (not a whole ILP pass): one round only, to
# keep the check fast.
CHUNK_CROSSING = (65536 + 77,)
# (shape, start, end): 32 lanes, tiles of 64 rows x 128 columns, cut mid-row at both ends, two row
# tiles and two column tiles; and 2 lanes, two matrices in one tile, cut mid-row.
FACTORED = (((70, 130), 65, 9035), ((2, 5, 7), 9, 61))
VECTOR_SIZE = 11


def _close(name: str, ours: Tensor, expected: Tensor, magnitude: Tensor, ulps: float = ELEMENTWISE_ULPS) -> None:
    """``|ours - expected| <= ulps * u * magnitude`` elementwise (float64), else ``RuntimeError``."""
    diff = (ours.double().cpu() - expected.double().cpu()).abs()
    bound = ulps * U * magnitude.double().cpu() + 1e-45
    if not bool((diff <= bound).all()):
        worst = float((diff / bound).max())
        raise RuntimeError(f"kernel self-check failed in {name}: difference up to {worst:.3g} times its fp32 bound")


def _exact(name: str, ours: Tensor, expected: Tensor) -> None:
    if not torch.equal(ours.float().cpu(), expected.float().cpu()):
        raise RuntimeError(f"kernel self-check failed in {name}: counts {ours.tolist()} != {expected.tolist()}")


def _terms(*tensors: Optional[Tensor]) -> Tensor:
    """Sum of magnitudes of the given tensors (the scale of an elementwise result's error)."""
    present = [t.double().abs() for t in tensors if t is not None]
    return sum(present[1:], present[0])


def _twins(device: torch.device, *sizes: int, positive: bool = False, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(sum(sizes) + seed)
    made = [torch.randn(size, generator=generator) for size in sizes]
    if positive:
        made = [t.abs() + 0.1 for t in made]
    return [t.to(device).clone() for t in made], [t.to(device).clone() for t in made]


def _check_adamw_lion(ops: Any, device: torch.device, sizes: tuple[int, ...], all_scales: tuple[Optional[Tensor], ...]) -> None:
    grads, _ = _twins(device, *sizes, seed=1)
    steps = (3, 3, 1)[: len(sizes)]
    for scales in all_scales:
        params, params_ref = _twins(device, *sizes)
        ms, ms_ref = _twins(device, *sizes, seed=2)
        vs, vs_ref = _twins(device, *sizes, positive=True, seed=3)
        old_p, old_m, old_v = [p.clone() for p in params], [m.clone() for m in ms], [v.clone() for v in vs]
        _exact("adamw_mask_counts", ops.adamw_mask_counts(grads, ms, 0.9), reference.adamw_mask_counts(grads, ms_ref, 0.9))
        kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scales=scales)
        ops.adamw_apply(params, grads, ms, vs, list(steps), **kwargs)
        reference.adamw_apply(params_ref, grads, ms_ref, vs_ref, list(steps), **kwargs)
        for i in range(len(sizes)):
            _close("adamw_apply exp_avg", ms[i], ms_ref[i], _terms(old_m[i], grads[i]))
            _close("adamw_apply exp_avg_sq", vs[i], vs_ref[i], _terms(old_v[i], grads[i] * grads[i]))
            t = steps[i]  # the step applied: lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) * scale
            step = 1e-2 / (1 - 0.9**t) * ms_ref[i].abs() / (vs_ref[i].sqrt() / math.sqrt(1 - 0.999**t)) * (2.0 if scales is not None else 1.0)
            _close("adamw_apply param", params[i], params_ref[i], _terms(old_p[i], step))
        old_p, old_m = [p.clone() for p in params], [m.clone() for m in ms]
        _exact("lion_mask_counts", ops.lion_mask_counts(grads, ms, 0.9), reference.lion_mask_counts(grads, ms_ref, 0.9))
        lion_kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
        ops.lion_apply(params, grads, ms, **lion_kwargs)
        reference.lion_apply(params_ref, grads, ms_ref, **lion_kwargs)
        for i in range(len(sizes)):
            _close("lion_apply param", params[i], params_ref[i], _terms(old_p[i]) + 2e-3 * 3)
            _close("lion_apply exp_avg", ms[i], ms_ref[i], _terms(old_m[i], grads[i]))
    if len(sizes) != len(ELEM_SIZES):
        return
    scales = torch.tensor([1.5, 2.0, 1.0], device=device)
    params, params_ref = _twins(device, *sizes)
    ms, ms_ref = _twins(device, *sizes, seed=2)
    old_p, old_m = [p.clone() for p in params], [m.clone() for m in ms]
    lion_kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
    counts, pending = ops.lion_cautious_begin(params, grads, ms, beta1=0.9, beta2=0.99)
    _exact("lion_cautious_begin counts", counts, reference.lion_mask_counts(grads, ms_ref, 0.9))
    ops.lion_cautious_finish(pending, params, grads, ms, **lion_kwargs)
    reference.lion_apply(params_ref, grads, ms_ref, **lion_kwargs)
    for i in range(len(sizes)):
        _close("lion_cautious_finish", params[i], params_ref[i], _terms(old_p[i]) + 2e-3 * 3)
        _close("lion_cautious_finish", ms[i], ms_ref[i], _terms(old_m[i], grads[i]))


def _sum_magnitudes(layout: FactoredLayout, terms: Tensor, ulps_per_term: float) -> tuple[Tensor, Tensor]:
    """Per-row and per-column ``(2k + ulps_per_term)`` times the sum of positive ``terms`` (in u)."""
    rows = torch.zeros(layout.num_row_factors, dtype=torch.float64, device=terms.device)
    cols = torch.zeros(layout.num_col_factors, dtype=torch.float64, device=terms.device)
    layout.add_row_col_sums(terms.double(), rows, cols)
    return (2 * layout.cols + ulps_per_term) * rows, (2 * layout.rows + ulps_per_term) * cols


def _check_came_factored(ops: Any, device: torch.device, shape: tuple[int, ...], start: int, end: int) -> None:
    layout = FactoredLayout(shape, start, end)
    n, seed = end - start, sum(shape)
    (grad, vector_grad), _ = _twins(device, n, VECTOR_SIZE, seed=seed)
    rows = torch.zeros(layout.num_row_factors, device=device)
    cols = torch.zeros(layout.num_col_factors, device=device)
    rows_ref, cols_ref = rows.clone(), cols.clone()
    ops.came_factored_sq_sums([grad], [layout], 1e-30, [rows], [cols])
    reference.came_factored_sq_sums([grad], [layout], 1e-30, [rows_ref], [cols_ref])
    row_mag, col_mag = _sum_magnitudes(layout, grad.double() ** 2, 4)
    _close("came_factored_sq_sums rows", rows, rows_ref, row_mag, 1.0)
    _close("came_factored_sq_sums cols", cols, cols_ref, col_mag, 1.0)
    (v,), (v_ref,) = _twins(device, VECTOR_SIZE, positive=True, seed=seed)
    old_v = v.clone()
    ops.came_vector_second_moment([vector_grad], [v], 0.999, 1e-30)
    reference.came_vector_second_moment([vector_grad], [v_ref], 0.999, 1e-30)
    _close("came_vector_second_moment", v, v_ref, _terms(old_v, vector_grad * vector_grad))
    (row_f, col_f), _ = _twins(device, layout.num_row_factors, layout.num_col_factors, positive=True, seed=seed)
    factors = [CameFactors(layout, row_f, col_f), CameFactors(elementwise=v)]
    grads = [grad, vector_grad]
    uh = [factors[0].apply_to(grad).double(), v.double().rsqrt() * vector_grad.double()]
    sumsq = torch.stack([(u * u).sum() for u in uh])
    _close("came_update_sumsq", ops.came_update_sumsq(grads, factors), reference.came_update_sumsq(grads, factors),
           sumsq * (2 * torch.tensor([n, VECTOR_SIZE], dtype=torch.float64, device=device) + RSQRT_ULPS + 2), 1.0)
    ms, ms_ref = _twins(device, n, VECTOR_SIZE, seed=seed + 1)
    old_m = [m.clone() for m in ms]
    res = [torch.zeros(layout.num_row_factors, device=device), None], [torch.zeros(layout.num_col_factors, device=device), None]
    res_ref = [t.clone() if t is not None else None for t in res[0]], [t.clone() if t is not None else None for t in res[1]]
    divisors = torch.tensor([1.7, 1.0], device=device)
    counts = ops.came_momentum(grads, ms, factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=res[0], res_col_sums=res[1])
    counts_ref = reference.came_momentum(grads, ms_ref, factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=res_ref[0], res_col_sums=res_ref[1])
    _exact("came_momentum counts", counts, counts_ref)
    for i in range(2):
        _close("came_momentum exp_avg", ms[i], ms_ref[i], _terms(old_m[i], uh[i] / divisors[i]), RSQRT_ULPS)
    # residual (uh - m)^2: each factor carries the error of uh and m, then the sums' order
    diff = (uh[0] / 1.7 - ms_ref[0].double()).abs()
    term_err = 2 * diff * RSQRT_ULPS * _terms(old_m[0], uh[0]) + diff**2 * ELEMENTWISE_ULPS
    row_mag, col_mag = _sum_magnitudes(layout, diff**2 + 1e-16, 4)
    err_rows, err_cols = _sum_magnitudes(layout, term_err, 0)
    _close("came_momentum residual rows", res[0][0], res_ref[0][0], row_mag + err_rows / (2 * layout.cols), 1.0)
    _close("came_momentum residual cols", res[1][0], res_ref[1][0], col_mag + err_cols / (2 * layout.rows), 1.0)
    confidence = [CameFactors(layout, row_f, col_f), CameFactors()]
    update = [confidence[0].apply_to(ms_ref[0]).double().abs() * 3.0, ms_ref[1].double().abs() * 3.0]
    kept, _ = _twins(device, n, VECTOR_SIZE, seed=seed + 1)  # the same start values as ms
    kept_res = [torch.zeros(layout.num_row_factors, device=device), None], [torch.zeros(layout.num_col_factors, device=device), None]
    kept_counts, pending = ops.came_cautious_begin(grads, kept, factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=kept_res[0], res_col_sums=kept_res[1])
    _exact("came_cautious_begin counts", kept_counts, counts_ref)
    params, params_ref = _twins(device, n, VECTOR_SIZE, seed=seed + 2)
    old_p = [p.clone() for p in params]
    kept_scales = torch.tensor([1.25, 3.0], device=device)
    ops.came_cautious_finish(pending, params, grads, kept, confidence, lr=1e-2, weight_decay=0.1, scales=kept_scales)
    reference.came_apply(params_ref, grads, ms_ref, confidence, lr=1e-2, weight_decay=0.1, scales=kept_scales)
    for i in range(2):
        _close("came_cautious_finish", params[i], params_ref[i], _terms(old_p[i], 1e-2 * update[i]), RSQRT_ULPS)
        _close("came_cautious_finish", kept[i], ms_ref[i], _terms(old_m[i], uh[i] / divisors[i]), RSQRT_ULPS)
    params, params_ref = _twins(device, n, VECTOR_SIZE, seed=seed + 2)
    for scales in (None, kept_scales):
        old_p = [p.clone() for p in params_ref]
        ops.came_apply(params, grads, ms_ref, confidence, lr=1e-2, weight_decay=0.1, scales=scales)
        reference.came_apply(params_ref, grads, ms_ref, confidence, lr=1e-2, weight_decay=0.1, scales=scales)
        for i in range(2):
            _close("came_apply", params[i], params_ref[i], _terms(old_p[i], 1e-2 * update[i]), 2 * ELEMENTWISE_ULPS)


def verify(ops: Any, device: torch.device) -> None:
    """Raise ``RuntimeError`` naming the first kernel that disagrees with the reference path."""
    _check_adamw_lion(ops, device, ELEM_SIZES, (None, torch.tensor([1.5, 2.0, 1.0], device=device)))
    _check_adamw_lion(ops, device, CHUNK_CROSSING, (torch.tensor([1.5], device=device),))
    for shape, start, end in FACTORED:
        _check_came_factored(ops, device, shape, start, end)

