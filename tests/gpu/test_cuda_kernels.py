"""The fused CUDA kernels against the torch reference path, element for element.

Every test feeds identical inputs to ``dist_cautious.kernels.reference`` and to the compiled
kernels (``cuda_ops.load()``), phase by phase, and compares every output. Tolerances are bounds
derived from fp32 rounding, not fitted numbers: with ``u = 2**-24`` (fp32 unit roundoff),
- an elementwise result that takes ``k`` roundings differs by at most about ``2k u`` of the
  magnitude of its operands (we allow 8u; torch may or may not fuse ``a + alpha*b`` into one FMA);
- a bf16 / fp16 param may land one unit in its last place away (a rounding boundary), i.e.
  ``2**-7`` / ``2**-10`` of its magnitude, or one subnormal unit near zero;
- a sum of ``k`` positive fp32 terms in any order is within ``(k - 1) u`` of the exact sum, so two
  orders differ by at most ``2 k u`` of the sum;
- the cautious mask may differ only where the reference's ``m_new`` is within the elementwise
  bound of zero ("ambiguous" entries, counted and excluded).
Skipped cleanly when CUDA is not available. On a GPU: ``python -m pytest tests/gpu -q``.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_cautious.kernels import reference
from dist_cautious.kernels.layout import FactoredLayout
from dist_cautious.kernels.reference import CameFactors
from tests.factor_buffers import assert_float64_factor_update_runs_the_reference, cloned, random_factor_buffers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

U = 2.0**-24
ELEMENTWISE_ULPS = 8
PARAM_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# one unit in the last place of the smallest (subnormal) values: fp16 params near zero round to it
PARAM_FLOOR = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
ODD_SIZES = [1, 3, 7, 1023, 65535, 65537, 300_001]
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


@pytest.fixture(scope="module")
def ops():
    from dist_cautious.kernels import cuda_ops

    return cuda_ops.load()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _randn(n: int, gen: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, generator=gen, device="cuda") * scale).to(dtype)


def _clone(tensors):
    return [t.clone() for t in tensors]


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str, exclude=None) -> None:
    """|actual - expected| <= bound elementwise (in float64), except where ``exclude``."""
    diff = (actual.double() - expected.double()).abs()
    bad = diff > bound.double()
    if exclude is not None:
        bad &= ~exclude
    if bad.any():
        index = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} entries outside the bound; first at {index}: "
            f"actual {actual[index].item()!r}, expected {expected[index].item()!r}, bound {bound[index].item()!r}"
        )


def _assert_params(actual, expected, old, decay: float, dtype, what: str, exclude=None) -> None:
    """A stepped param: fp32 error of the update plus one unit of the param's own rounding."""
    old64, exp64 = old.double(), expected.double()
    magnitude = old64.abs() + (exp64 - old64 * decay).abs()
    bound = (PARAM_ROUNDING[dtype] + ELEMENTWISE_ULPS * U) * magnitude + PARAM_FLOOR[dtype]
    _assert_within(actual, expected, bound, what, exclude)


def _ambiguous_lerp(m: torch.Tensor, g: torch.Tensor, weight: float) -> torch.Tensor:
    """Entries whose ``lerp(m, g, weight)`` is within the elementwise bound of zero."""
    new = torch.lerp(m, g.float(), weight)
    return new.abs() <= ELEMENTWISE_ULPS * U * (m.abs() + weight * g.float().abs())


def _elementwise_case(sizes, param_dtype, grad_dtype, seed):
    gen = _generator(seed)
    params = [_randn(n, gen, param_dtype) for n in sizes]
    grads = [_randn(n, gen, grad_dtype, 0.1) for n in sizes]
    exp_avgs = [_randn(n, gen, scale=0.05) for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=gen, device="cuda") * 1e-2 for n in sizes]
    return params, grads, exp_avgs, exp_avg_sqs


def _check_counts(native: torch.Tensor, expected: torch.Tensor, ambiguous: list[torch.Tensor]) -> None:
    assert native.dtype == torch.float32 and native.device.type == "cuda"
    assert native.shape == expected.shape
    for index, amb in enumerate(ambiguous):
        slack = int(amb.sum())
        assert abs(float(native[index]) - float(expected[index])) <= slack, (index, float(native[index]), float(expected[index]), slack)


@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("cautious", [False, True])
def test_adamw_matches_reference(ops, param_dtype, grad_dtype, cautious):
    lr, beta1, beta2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.01
    steps = [1, 2, 5, 1, 10, 3, 7]
    params, grads, exp_avgs, exp_avg_sqs = _elementwise_case(ODD_SIZES, param_dtype, grad_dtype, seed=1)
    old_p, old_m, old_v = _clone(params), _clone(exp_avgs), _clone(exp_avg_sqs)
    ambiguous = [_ambiguous_lerp(m, g, 1 - beta1) for m, g in zip(old_m, grads)]

    expected_counts = reference.adamw_mask_counts(grads, exp_avgs, beta1)
    native_counts = ops.adamw_mask_counts(grads, exp_avgs, beta1)
    _check_counts(native_counts, expected_counts, ambiguous)
    for m, m0 in zip(exp_avgs, old_m):  # the count phase reads only
        assert torch.equal(m, m0)

    scales = reference.mask_scales(expected_counts, ODD_SIZES) if cautious else None
    ref_p, ref_m, ref_v = _clone(params), _clone(exp_avgs), _clone(exp_avg_sqs)
    reference.adamw_apply(ref_p, grads, ref_m, ref_v, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, scales=scales)
    ops.adamw_apply(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, scales=scales)
    for i in range(len(ODD_SIZES)):
        g = grads[i].float()
        _assert_within(exp_avgs[i], ref_m[i], ELEMENTWISE_ULPS * U * (old_m[i].abs() + g.abs()), f"exp_avg[{i}]")
        _assert_within(exp_avg_sqs[i], ref_v[i], ELEMENTWISE_ULPS * U * (old_v[i].abs() + g * g), f"exp_avg_sq[{i}]")
        _assert_params(params[i], ref_p[i], old_p[i], 1 - lr * wd, param_dtype, f"param[{i}]", ambiguous[i] if cautious else None)
        assert not torch.equal(exp_avgs[i], old_m[i])  # the step did something
        if param_dtype == torch.float32:
            assert not torch.equal(params[i], old_p[i])


@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("cautious", [False, True])
def test_lion_matches_reference(ops, param_dtype, grad_dtype, cautious):
    lr, beta1, beta2, wd = 1e-4, 0.9, 0.99, 0.1
    params, grads, exp_avgs, _ = _elementwise_case(ODD_SIZES, param_dtype, grad_dtype, seed=2)
    old_p, old_m = _clone(params), _clone(exp_avgs)
    ambiguous = [_ambiguous_lerp(m, g, 1 - beta1) for m, g in zip(old_m, grads)]

    expected_counts = reference.lion_mask_counts(grads, exp_avgs, beta1)
    _check_counts(ops.lion_mask_counts(grads, exp_avgs, beta1), expected_counts, ambiguous)

    scales = reference.mask_scales(expected_counts, ODD_SIZES) if cautious else None
    ref_p, ref_m = _clone(params), _clone(exp_avgs)
    reference.lion_apply(ref_p, grads, ref_m, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, scales=scales)
    ops.lion_apply(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, scales=scales)
    for i in range(len(ODD_SIZES)):
        g = grads[i].float()
        _assert_within(exp_avgs[i], ref_m[i], ELEMENTWISE_ULPS * U * (old_m[i].abs() + g.abs()), f"exp_avg[{i}]")
        # sign() of an ambiguous interpolation may differ even without the mask
        _assert_params(params[i], ref_p[i], old_p[i], 1 - lr * wd, param_dtype, f"param[{i}]", ambiguous[i])


# --- CAME --------------------------------------------------------------------------------------
# Fragments: whole tensors, batches of matrices, ranges cut mid-row (ZeRO-1/2), a matrix wide
# enough for several column tiles, tiny matrices (a conv kernel), and 1-D tensors.
FACTORED = [
    ((5, 3), 0, 15),
    ((4, 3, 2, 2), 0, 48),
    ((7, 300), 150, 1900),
    ((3, 1000, 5), 1234, 14001),
    ((64, 32, 3, 3), 5, 64 * 32 * 9 - 4),
    ((1024, 4099), 0, 1024 * 4099),
    ((1024, 4099), 1000, 2_000_001),
    ((2, 70, 129), 0, 2 * 70 * 129),
]
VECTOR = [1, 9, 65537, 300_001]


def _came_case(param_dtype, grad_dtype, seed):
    gen = _generator(seed)
    layouts = [FactoredLayout(shape, start, end) for shape, start, end in FACTORED]
    sizes = [layout.end - layout.start for layout in layouts] + VECTOR
    params = [_randn(n, gen, param_dtype) for n in sizes]
    grads = [_randn(n, gen, grad_dtype, 0.1) for n in sizes]
    exp_avgs = [_randn(n, gen, scale=0.05) for n in sizes]
    factors = []
    for layout in layouts:
        row = torch.rand(layout.num_row_factors, generator=gen, device="cuda") + 0.5
        col = torch.rand(layout.num_col_factors, generator=gen, device="cuda") + 0.5
        factors.append(CameFactors(layout, row, col))
    for n in VECTOR:
        factors.append(CameFactors(elementwise=torch.rand(n, generator=gen, device="cuda") * 1e-2 + 1e-4))
    return layouts, params, grads, exp_avgs, factors


def _sum_bound(layout: FactoredLayout, values: torch.Tensor, extra: torch.Tensor | None = None):
    """Bounds on row and column sums of positive ``values`` (plus per-element ``extra`` error)."""
    rows = torch.zeros(layout.num_row_factors, device="cuda", dtype=torch.float64)
    cols = torch.zeros(layout.num_col_factors, device="cuda", dtype=torch.float64)
    layout.add_row_col_sums(values.double(), rows, cols)
    row_bound = 2 * layout.cols * U * rows
    col_bound = 2 * layout.rows * U * cols
    if extra is not None:
        extra_rows = torch.zeros_like(rows)
        extra_cols = torch.zeros_like(cols)
        layout.add_row_col_sums(extra.double(), extra_rows, extra_cols)
        row_bound, col_bound = row_bound + extra_rows, col_bound + extra_cols
    return row_bound, col_bound


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_came_factored_sq_sums(ops, grad_dtype):
    layouts, _, grads, _, _ = _came_case(torch.float32, grad_dtype, seed=3)
    grads = grads[: len(layouts)]
    eps1 = 1e-30
    ref_rows = [torch.zeros(l.num_row_factors, device="cuda") for l in layouts]
    ref_cols = [torch.zeros(l.num_col_factors, device="cuda") for l in layouts]
    nat_rows, nat_cols = _clone(ref_rows), _clone(ref_cols)
    reference.came_factored_sq_sums(grads, layouts, eps1, ref_rows, ref_cols)
    ops.came_factored_sq_sums(grads, layouts, eps1, nat_rows, nat_cols)
    for i, layout in enumerate(layouts):
        g = grads[i].float()
        row_bound, col_bound = _sum_bound(layout, g * g + eps1)
        _assert_within(nat_rows[i], ref_rows[i], row_bound, f"row sums[{i}] {layout.shape}")
        _assert_within(nat_cols[i], ref_cols[i], col_bound, f"col sums[{i}] {layout.shape}")
        assert (nat_rows[i] > 0).sum() > 0


def test_came_vector_second_moment(ops):
    gen = _generator(4)
    grads = [_randn(n, gen, torch.bfloat16, 0.1) for n in VECTOR]
    states = [torch.rand(n, generator=gen, device="cuda") * 1e-2 for n in VECTOR]
    old = _clone(states)
    expected = _clone(states)
    reference.came_vector_second_moment(grads, expected, 0.999, 1e-30)
    ops.came_vector_second_moment(grads, states, 0.999, 1e-30)
    for i in range(len(VECTOR)):
        g = grads[i].float()
        _assert_within(states[i], expected[i], ELEMENTWISE_ULPS * U * (old[i] + g * g), f"exp_avg_sq[{i}]")
        assert not torch.equal(states[i], old[i])


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_came_update_sumsq(ops, grad_dtype):
    _, _, grads, _, factors = _came_case(torch.float32, grad_dtype, seed=5)
    factors = factors + [CameFactors()]  # the identity preconditioner
    grads = grads + [_randn(77, _generator(6), grad_dtype)]
    native = ops.came_update_sumsq(grads, factors)
    assert native.dtype == torch.float32 and native.shape == (len(grads),)
    for i, (grad, factor) in enumerate(zip(grads, factors)):
        update = factor.apply_to(grad.float())
        exact = (update.double() ** 2).sum()  # of the reference's own fp32 elements
        assert abs(float(native[i]) - float(exact)) <= ELEMENTWISE_ULPS * U * float(exact), (i, float(native[i]), float(exact))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_came_momentum(ops, grad_dtype):
    layouts, _, grads, exp_avgs, factors = _came_case(torch.float32, grad_dtype, seed=7)
    beta1, eps2 = 0.9, 1e-16
    divisors = torch.linspace(1.0, 3.0, len(grads), device="cuda")
    old_m = _clone(exp_avgs)
    res_rows = [torch.zeros(l.num_row_factors, device="cuda") for l in layouts] + [None] * len(VECTOR)
    res_cols = [torch.zeros(l.num_col_factors, device="cuda") for l in layouts] + [None] * len(VECTOR)
    nat_rows, nat_cols = [None if t is None else t.clone() for t in res_rows], [None if t is None else t.clone() for t in res_cols]
    ref_m = _clone(exp_avgs)
    expected_counts = reference.came_momentum(grads, ref_m, factors, divisors, beta1=beta1, eps2=eps2, res_row_sums=res_rows, res_col_sums=res_cols)
    native_counts = ops.came_momentum(grads, exp_avgs, factors, divisors, beta1=beta1, eps2=eps2, res_row_sums=nat_rows, res_col_sums=nat_cols)
    ambiguous = []
    for i, factor in enumerate(factors):
        g = grads[i].float()
        update = factor.apply_to(g).div_(divisors[i])
        m_bound = ELEMENTWISE_ULPS * U * (old_m[i].abs() + update.abs())
        ambiguous.append(ref_m[i].abs() <= m_bound)
        _assert_within(exp_avgs[i], ref_m[i], m_bound, f"exp_avg[{i}]")
        if factor.layout is not None:
            diff = (update - ref_m[i]).abs()
            residual = diff * diff + eps2
            row_bound, col_bound = _sum_bound(factor.layout, residual, 2 * diff * m_bound + m_bound * m_bound)
            _assert_within(nat_rows[i], res_rows[i], row_bound, f"residual row sums[{i}]")
            _assert_within(nat_cols[i], res_cols[i], col_bound, f"residual col sums[{i}]")
    _check_counts(native_counts, expected_counts, ambiguous)


@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("cautious", [False, True])
def test_came_apply(ops, param_dtype, grad_dtype, cautious):
    layouts, params, grads, exp_avgs, factors = _came_case(param_dtype, grad_dtype, seed=8)
    # the final update's confidence: row x column for factored fragments, identity for 1-D
    confidence = [f if f.layout is not None else CameFactors() for f in factors]
    lr, wd = 2e-4, 0.01
    sizes = [p.numel() for p in params]
    counts = torch.tensor([max(1, n // 2) for n in sizes], dtype=torch.float32, device="cuda")
    scales = reference.mask_scales(counts, sizes) if cautious else None
    old_p = _clone(params)
    ref_p = _clone(params)
    reference.came_apply(ref_p, grads, exp_avgs, confidence, lr=lr, weight_decay=wd, scales=scales)
    ops.came_apply(params, grads, exp_avgs, confidence, lr=lr, weight_decay=wd, scales=scales)
    for i in range(len(params)):
        _assert_params(params[i], ref_p[i], old_p[i], 1 - lr * wd, param_dtype, f"param[{i}]")


def _slot(scales, i):
    return None if scales is None else scales[i : i + 1]


@pytest.mark.parametrize("cautious", [False, True])
def test_lr_and_weight_decay_per_tensor_equal_one_call_per_tensor(ops, cautious):
    """One launch over tensors of different lr / weight decay (per-tensor lists: param groups in
    one call) gives each tensor the bits of a call with its own scalars, for every apply phase."""
    sizes = [1, 1023, 65537, 7]
    lrs, wds = [1e-4, 3e-3, 1e-2, 5e-4], [0.0, 0.3, 0.01, 0.1]
    scales = torch.linspace(1.0, 2.0, len(sizes), device="cuda") if cautious else None
    params, grads, ms, vs = _elementwise_case(sizes, torch.bfloat16, torch.float32, seed=21)
    steps = [1, 5, 2, 9]
    single = [_clone(params), _clone(ms), _clone(vs)]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8)
    ops.adamw_apply(params, grads, ms, vs, steps, lr=lrs, weight_decay=wds, scales=scales, **kw)
    for i in range(len(sizes)):
        ops.adamw_apply([single[0][i]], [grads[i]], [single[1][i]], [single[2][i]], [steps[i]], lr=lrs[i], weight_decay=wds[i], scales=_slot(scales, i), **kw)
    assert all(torch.equal(a, b) for a, b in zip(params + ms + vs, single[0] + single[1] + single[2])), "adamw"
    params, grads, ms, _ = _elementwise_case(sizes, torch.float32, torch.float32, seed=22)
    single = [_clone(params), _clone(ms)]
    finish = ops.lion_cautious_finish if cautious else (lambda pending, *args, **kwargs: ops.lion_apply(*args, **kwargs))
    finish(None, params, grads, ms, lr=lrs, beta1=0.9, beta2=0.99, weight_decay=wds, scales=scales)
    for i in range(len(sizes)):
        finish(None, [single[0][i]], [grads[i]], [single[1][i]], lr=lrs[i], beta1=0.9, beta2=0.99, weight_decay=wds[i], scales=_slot(scales, i))
    assert all(torch.equal(a, b) for a, b in zip(params + ms, single[0] + single[1])), "lion"
    _, params, grads, ms, factors = _came_case(torch.float32, torch.float32, seed=23)
    count = len(params)
    lrs, wds = [1e-4 * (1 + i) for i in range(count)], [0.0] + [0.02 * i for i in range(1, count)]
    scales = torch.linspace(1.0, 2.0, count, device="cuda") if cautious else None
    single = _clone(params)
    finish = ops.came_cautious_finish if cautious else (lambda pending, *args, **kwargs: ops.came_apply(*args, **kwargs))
    finish(None, params, grads, ms, factors, lr=lrs, weight_decay=wds, scales=scales)
    for i in range(count):
        finish(None, [single[i]], [grads[i]], [ms[i]], [factors[i]], lr=lrs[i], weight_decay=wds[i], scales=_slot(scales, i))
    assert all(torch.equal(a, b) for a, b in zip(params, single)), "came"


def test_fallback_for_float64_and_noncontiguous(ops):
    """Inputs the kernels do not take run the reference path: same results, no error."""
    gen = _generator(9)
    params = [torch.randn(10, generator=gen, device="cuda", dtype=torch.float64)]
    grads = [torch.randn(10, generator=gen, device="cuda", dtype=torch.float64)]
    exp_avgs = [torch.randn(20, generator=gen, device="cuda")[::2]]
    expected = reference.lion_mask_counts(grads, exp_avgs, 0.9)
    assert torch.equal(ops.lion_mask_counts(grads, exp_avgs, 0.9), expected)


# --- beyond 2^31 elements --------------------------------------------------------------------
BIG = 2**31 + 4099  # one tensor past 2^31 elements: 64-bit offsets inside a tensor and across the list


def _need_memory(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


def _windows(n: int, width: int = 4099) -> list[slice]:
    """Element ranges around the ends and around 2^31 (where 32-bit offsets would wrap)."""
    starts = [0, 2**31 - width // 2, n - width]
    return [slice(max(0, s), min(n, s + width)) for s in starts]


def test_lion_beyond_2_pow_31_elements(ops):
    _need_memory(24)
    gen = _generator(10)
    sizes = [BIG, 12_345, 3]
    params = [torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16) for n in sizes]
    grads = [torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16) for n in sizes]
    exp_avgs = [torch.randn(n, generator=gen, device="cuda") * 0.5 for n in sizes]
    lr, beta1, beta2 = 1e-4, 0.9, 0.99
    # exact integer counts (the reference's float32 sum is itself inexact above 2^24)
    exact = []
    for g, m in zip(grads, exp_avgs):
        count = 0
        for chunk in range(0, g.numel(), 2**28):
            gs, ms = g[chunk : chunk + 2**28].float(), m[chunk : chunk + 2**28]
            count += int((torch.lerp(ms, gs, 1 - beta1).sign_() * gs > 0).sum())
        exact.append(count)
    native_counts = ops.lion_mask_counts(grads, exp_avgs, beta1)
    ambiguous = [int(sum(_ambiguous_lerp(m[w], g[w], 1 - beta1).sum() for w in [slice(c, c + 2**28) for c in range(0, g.numel(), 2**28)])) for g, m in zip(grads, exp_avgs)]
    for i, count in enumerate(exact):
        # within the ambiguous entries, then float32 rounding of the count itself
        assert abs(float(native_counts[i]) - count) <= ambiguous[i] + count * U * 2, (i, float(native_counts[i]), count)
    scales = reference.mask_scales(native_counts, sizes)
    windows = [_windows(n) for n in sizes]
    saved = [[(p[w].clone(), g[w].clone(), m[w].clone()) for w in ws] for p, g, m, ws in zip(params, grads, exp_avgs, windows)]
    ops.lion_apply(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, scales=scales)
    for i, tensor_windows in enumerate(saved):
        for w, (p0, g0, m0) in zip(windows[i], tensor_windows):
            ref_p, ref_m = [p0.clone()], [m0.clone()]
            amb = _ambiguous_lerp(m0, g0, 1 - beta1)
            reference.lion_apply(ref_p, [g0], ref_m, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, scales=scales[i : i + 1])
            _assert_within(exp_avgs[i][w], ref_m[0], ELEMENTWISE_ULPS * U * (m0.abs() + g0.float().abs()), f"exp_avg[{i}][{w}]")
            _assert_params(params[i][w], ref_p[0], p0, 1.0, torch.bfloat16, f"param[{i}][{w}]", amb)


def test_came_row_col_sums_beyond_2_pow_31_elements(ops):
    _need_memory(16)
    shape = (2, 32768, 32771)  # 2^31 + 393216 elements, a batch of two matrices
    numel = math.prod(shape)
    layout = FactoredLayout(shape, 3, numel - 5)  # cut mid-row at both ends
    gen = _generator(11)
    grad = torch.randn(layout.end - layout.start, generator=gen, device="cuda", dtype=torch.bfloat16)
    rows = torch.zeros(layout.num_row_factors, device="cuda")
    cols = torch.zeros(layout.num_col_factors, device="cuda")
    ops.came_factored_sq_sums([grad], [layout], 1e-30, [rows], [cols])
    ref_rows, ref_cols = torch.zeros_like(rows), torch.zeros_like(cols)
    # the reference in pieces of whole rows (its temporaries would not fit otherwise)
    cols_per_row = shape[-1]
    piece_rows = 4096
    first = layout.start
    while first < layout.end:
        stop = min(layout.end, (first // cols_per_row + piece_rows) * cols_per_row)
        piece = FactoredLayout(shape, first, stop)
        g = grad[first - layout.start : stop - layout.start].float()
        piece.add_row_col_sums(g * g + 1e-30, ref_rows, ref_cols)
        first = stop
    row_bound = 2 * shape[-1] * U * ref_rows  # positive terms: any summation order is within (k-1)u
    col_bound = 2 * shape[-2] * U * ref_cols
    _assert_within(rows, ref_rows, row_bound, "row sums")
    _assert_within(cols, ref_cols, col_bound, "col sums")


# --- the optimizers end to end: native kernels vs the reference path ---------------------------
def _train(optimizer_cls, kwargs, mode, monkeypatch, steps=5):
    from dist_cautious.kernels import _loaded

    monkeypatch.setenv("DIST_CAUTIOUS_KERNELS", mode)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 6, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 7)
    ).cuda()
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    data = torch.randn(16, 3, 8, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    if mode == "native":
        assert _loaded.get("cuda") is not None  # the kernels really ran
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["CautiousAdamW", "CautiousLion", "CAME"])
def test_optimizers_native_equal_reference(name, monkeypatch):
    import dist_cautious.optim as optim

    kwargs = {"CautiousAdamW": {}, "CautiousLion": {}, "CAME": {"lr": 2e-4, "cautious": True}}[name]
    native = _train(getattr(optim, name), kwargs, "native", monkeypatch)
    expected = _train(getattr(optim, name), kwargs, "reference", monkeypatch)
    for a, b in zip(native, expected):
        # ALGORITHMS.md's bar for "the same optimizer": rtol 1e-4 after several steps
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# (R, C, matrices): warp-shared matrices (R <= 32) and block matrices (R > 32, up to 70000 rows,
# several passes of the kernel's 1024 leaves), 70000 columns, the two paths interleaved.
FACTOR_RUNS = [(1, 5, 70), (3, 4, 3), (33, 2, 2), (7, 9, 1), (32, 3, 5), (70000, 2, 1), (2, 70000, 1), (100, 17, 3), (5, 3, 13),
               (2500, 4, 2), (17, 6, 4)]


@pytest.mark.parametrize("beta", [0.999, 0.9])
def test_came_factor_update(ops, beta):
    """The kernel against torch's own CUDA ops on the same inputs: row / column state and column
    factor bit for bit (torch's CUDA rsqrt is rsqrtf, as the kernel's); the means within the sum
    bound of torch's fp32 mean (the kernel sums in float64 in a fixed order); the row factor bit
    for bit what torch's ops make of the kernel's own means; a second run repeats bit for bit."""
    native = random_factor_buffers(FACTOR_RUNS, 3, device="cuda")
    expected = cloned(native)
    again = cloned(native)
    ops.came_factor_update(native, beta)
    ops.came_factor_update(again, beta)
    reference.came_factor_update(expected, beta)
    for key in ("row_state", "col_state", "col_factor", "row_factor", "means"):
        assert torch.equal(getattr(native, key), getattr(again, key)), f"{key}: a second run differs"
    for key in ("row_state", "col_state", "col_factor"):
        differ = int((getattr(native, key) != getattr(expected, key)).sum())
        assert differ == 0, f"{key}: {differ} elements differ from torch's ops"
    first = matrix = 0
    for R, _, k in FACTOR_RUNS:
        means = native.means[matrix : matrix + k]
        ref_means = expected.means[matrix : matrix + k].double()
        bound = (R + 64) * U * ref_means.abs()
        assert bool(((means.double() - ref_means).abs() <= bound).all()), f"means of R={R}"
        state = native.row_state[first : first + R * k].view(k, R)
        row_factor = (state / means.view(k, 1)).rsqrt().view(-1)
        assert torch.equal(native.row_factor[first : first + R * k], row_factor), f"row factor of R={R}"
        first, matrix = first + R * k, matrix + k


def test_came_factor_update_float64_runs_the_reference(ops):
    assert_float64_factor_update_runs_the_reference(ops, "cuda")


# The per-tensor step scalars (step_scalars.cu): one launch each, lengths up to several blocks of
# 256 threads and past the 1024-block grid (grid-stride).
SCALAR_LENGTHS = [1, 5, 255, 256, 257, 1000, 300_001]


def _bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Elements whose bits differ, NaN equal to NaN (payloads aside); 0 when bit for bit."""
    same = (actual.view(torch.int32) == expected.view(torch.int32)) | (actual.isnan() & expected.isnan())
    return int((~same).sum())


@pytest.mark.parametrize("n", SCALAR_LENGTHS)
def test_mask_scales(ops, n):
    """Bit for bit torch's CUDA ops (``1.0 / (counts / sizes).clamp(min=1e-3)``): count 0 (clamped),
    count == size, means either side of 1e-3, a NaN count, sizes not all exact in fp32."""
    gen = _generator(60 + n)
    sizes = torch.randint(1, 2**27, (n,), generator=gen, device="cuda").float()
    counts = (torch.rand(n, generator=gen, device="cuda") * sizes).floor()
    specials = torch.tensor([0.0, -1.0, 3.0, 5.0, float("nan")], device="cuda")[: min(n, 5)]
    counts[: specials.numel()] = torch.where(specials == -1.0, sizes[: specials.numel()], specials)
    if n >= 4:
        sizes[2:4] = 4000.0
    scales = ops.mask_scales(counts, sizes)
    assert _bits_equal(scales, reference.mask_scales(counts, sizes)) == 0
    assert _bits_equal(scales, 1.0 / (counts / sizes).clamp(min=1e-3)) == 0


# d = 1.1: fp32(1 / d) in double differs from 1.0f / fp32(d), so a reciprocal formed another way fails
@pytest.mark.parametrize("threshold", [1.0, 1.1, 3.0])
@pytest.mark.parametrize("n", SCALAR_LENGTHS)
def test_came_clip_divisors(ops, n, threshold):
    """Bit for bit torch's CUDA ops (``(sumsq.sqrt() / sqrt_sizes / d).clamp(min=1.0)``: sqrtf, IEEE
    division, the scalar division as x * (1 / fp32(d))), divisors either side of the clamp, sumsq
    0, NaN and inf."""
    gen = _generator(80 + n)
    sizes = torch.randint(1, 2**22, (n,), generator=gen, device="cuda").float()
    rms = threshold * torch.exp2((torch.rand(n, generator=gen, device="cuda") - 0.5) * 8)
    sumsq = (rms.double().square() * sizes.double()).float()
    specials = torch.tensor([0.0, float("nan"), float("inf")], device="cuda")[: min(n, 3)]
    sumsq[: specials.numel()] = specials
    sqrt_sizes = sizes.sqrt()
    divisors = ops.came_clip_divisors(sumsq, sqrt_sizes, threshold)
    assert _bits_equal(divisors, reference.came_clip_divisors(sumsq, sqrt_sizes, threshold)) == 0
    inv = float(torch.tensor(1.0 / float(torch.tensor(threshold, dtype=torch.float32)), dtype=torch.float32))
    assert _bits_equal(divisors, (sumsq.double().sqrt().float() / sqrt_sizes * inv).clamp(min=1.0)) == 0


def test_step_scalars_launch_once(ops):
    """One kernel each, whatever the number of tensors (torch's ops: three and four)."""
    counts, sizes = torch.rand(1000, device="cuda") * 100, torch.full((1000,), 100.0, device="cuda")
    sqrt_sizes = sizes.sqrt()
    ops.mask_scales(counts, sizes)
    ops.came_clip_divisors(counts, sqrt_sizes, 1.0)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.mask_scales(counts, sizes)
        ops.came_clip_divisors(counts, sqrt_sizes, 1.0)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("mask_scales" in k for k in kernels) == 1 and sum("clip_divisors" in k for k in kernels) == 1, kernels


# ---- capturable: the step-scalars table and a real CUDA-graph capture ----------------------------
def _adamw_step_table(lrs: list[float], weight_decay: float, step: int) -> torch.Tensor:
    """adamw_apply's step-scalars table on the device, one row per tensor: fp32 alpha,
    1 / fp32(sqrt(1 - beta2^t)), decay, -lr, formed as the host path forms and rounds them."""
    bc2_sqrt = torch.tensor([math.sqrt(1 - 0.999**step)] * len(lrs), dtype=torch.float32)
    alpha = torch.tensor([-(lr / (1 - 0.9**step)) for lr in lrs], dtype=torch.float32)
    decay = torch.tensor([1 - lr * weight_decay for lr in lrs], dtype=torch.float32)
    neg_lr = torch.tensor([-lr for lr in lrs], dtype=torch.float32)
    return torch.stack([alpha, torch.div(torch.ones_like(bc2_sqrt), bc2_sqrt), decay, neg_lr], dim=1).cuda()


def test_adamw_apply_captured_in_a_cuda_graph_replays_new_table_values():
    """capturable=True: adamw_apply with a step-scalars table, warmed up on a side stream, captured
    by torch.cuda.graph (on a stream of its own: the binding finds the warm-up's descriptor table
    and uploads nothing) and replayed after the table's values changed in place, lands on the bits
    of eager calls with those values. An unseen call inside a capture raises."""
    from dist_cautious.kernels.build import load

    ext = load("cuda")
    sizes, lrs = [1, 1023, 65537, 7], [1e-4, 3e-3, 1e-2, 5e-4]
    params, grads, ms, vs = _elementwise_case(sizes, torch.bfloat16, torch.float32, seed=31)
    eager = [_clone(params), _clone(ms), _clone(vs)]

    def call(p, m, v, table):
        ext.adamw_apply(p, grads, m, v, [], [], [], 0.1, 0.999, 0.001, 1e-8, None, table)

    static = _adamw_step_table(lrs, 0.01, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(params, ms, vs, static)  # the warm-up: step 1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    uploads = ext.descriptor_uploads()
    with torch.cuda.graph(graph):
        call(params, ms, vs, static)
    assert ext.descriptor_uploads() == uploads, "the capture uploaded a descriptor table"
    for step in (2, 3, 4):
        static.copy_(_adamw_step_table(lrs, 0.01, step))
        graph.replay()
    for step in (1, 2, 3, 4):
        call(*eager, _adamw_step_table(lrs, 0.01, step))
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(params + ms + vs, eager[0] + eager[1] + eager[2]))
    unseen = [_clone(params), _clone(ms), _clone(vs)]
    with pytest.raises(RuntimeError, match="not seen before capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            call(*unseen, static)
