"""The native CPU kernels against the torch reference path (kernels/reference.py), element for element.

Every instruction set the CPU supports (AVX-512, AVX2, scalar) is tested, over sizes that hit
empty tensors, tensors smaller than one vector, vector tails and tile boundaries, with fp32,
bf16 and fp16 params and grads, and over factored layouts cut mid-row, batched and large.

What "equal" means here, derived from fp32 rounding:
- Mask counts, momentum and second-moment state, Lion and CAME params: bit for bit (the kernels
  run torch's op sequence: lerp and add(alpha) as fmadd, addcmul as fmadd(value*t1, t2, self)).
- AdamW params: torch's ``sqrt`` on CPU may come from MKL's vector math, which is not correctly
  rounded (measured up to 1.5 ulp off here); the kernel uses the IEEE sqrt. The denominator may
  then differ by up to 2 ulp, the update term by up to 4 ulp (2^-21 relative), and the sum with
  the param by one more rounding: |p - p_ref| <= 2^-21 |update| + ulp(p_ref) in the param's dtype.
- Sums (row/col sums, sum of squares): the reference sums in fp32 in its own order; the kernel
  adds runs of at most 64 vectors per lane (row sums, sums of squares) or 64 rows (column sums)
  in fp32 and those partials in double. For n positive terms the reference's error is at most n * 2^-24 * sum
  (recursive summation bound, which also covers pairwise), the kernel's at most 64 * 2^-24 * sum,
  so |s - s_ref| <= (n + 64) * 2^-24 * s_ref.

With DIST_CAUTIOUS_KERNELS=native a failed build fails this file; otherwise it is skipped with
the build error as the reason.
"""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

from dist_cautious import kernels
from dist_cautious.kernels import reference as ref
from dist_cautious.kernels.layout import FactoredLayout
from dist_cautious.kernels.reference import CameFactors
from tests.factor_buffers import assert_float64_factor_update_runs_the_reference, cloned, random_factor_buffers

EPS32 = 2.0**-24  # unit roundoff of fp32


def _load_ops():
    from dist_cautious.kernels import cpu_ops

    try:
        return cpu_ops.load(), None
    except Exception as error:  # a missing compiler or a failed build
        return None, error


OPS, BUILD_ERROR = _load_ops()


@pytest.fixture(scope="module")
def ops():
    if OPS is None:
        message = f"native CPU kernels could not be built: {BUILD_ERROR}"
        if os.environ.get("DIST_CAUTIOUS_KERNELS", "auto").lower() == "native":
            pytest.fail(message)
        pytest.skip(message)
    return OPS


ISAS = OPS.module.available_isas() if OPS is not None else ["unbuilt"]


@pytest.fixture(params=ISAS)
def isa_ops(request, ops):
    ops.module.set_isa(request.param)
    yield ops
    ops.module.set_isa("auto")


def _tile() -> int:
    return OPS.module.tile_size() if OPS is not None else 1 << 15


# empty, one element, below/at/above one AVX2 (8) and AVX-512 (16) vector, odd, and across tiles
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 33, 1000, None]  # None: two tiles and a tail
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]


def _size(n):
    return 2 * _tile() + 5 if n is None else n


def _data(n: int, param_dtype: torch.dtype, grad_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + n)
    p = torch.randn(n, generator=gen).to(param_dtype)
    g = torch.randn(n, generator=gen).to(grad_dtype)
    m = torch.randn(n, generator=gen) * 0.1
    v = torch.rand(n, generator=gen) * 0.01
    return p, g, m, v


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |x| (at least the smallest normal's spacing)."""
    info = torch.finfo(dtype)
    mag = x.float().abs().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    diff = (actual.float() != expected.float()) & ~(actual.float().isnan() & expected.float().isnan())
    assert not diff.any(), f"{what}: {int(diff.sum())} of {actual.numel()} differ, max {float((actual.float() - expected.float()).abs().max())}"


def _assert_sum_close(actual: torch.Tensor, expected: torch.Tensor, terms: int, what: str) -> None:
    bound = (terms + 64) * EPS32 * expected.abs() + torch.finfo(torch.float32).tiny
    excess = (actual - expected).abs() - bound
    assert (excess <= 0).all(), f"{what}: off by {float((actual - expected).abs().max())} > bound for {terms} terms"


# ------------------------------------------------------------------------- AdamW / Lion ------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
@pytest.mark.parametrize("cautious", [False, True])
def test_adamw_matches_reference(isa_ops, n, param_dtype, grad_dtype, cautious):
    n = _size(n)
    p, g, m, v = _data(n, param_dtype, grad_dtype)
    counts = isa_ops.adamw_mask_counts([g], [m], 0.9)
    _assert_equal(counts, ref.adamw_mask_counts([g], [m], 0.9), "mask counts")
    scales = ref.mask_scales(counts, [max(n, 1)]) if cautious else None
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, scales=scales)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    ref.adamw_apply([p_ref], [g], [m_ref], [v_ref], [3], **hyper)
    isa_ops.adamw_apply([p], [g], [m], [v], [3], **hyper)
    _assert_equal(m, m_ref, "exp_avg")
    _assert_equal(v, v_ref, "exp_avg_sq")
    decayed = _data(n, param_dtype, grad_dtype)[0].float() * (1 - 1e-3 * 0.01)
    update = (p_ref.float() - decayed).abs()
    bound = 2.0**-21 * update + _ulp(p_ref, param_dtype)
    err = (p.float() - p_ref.float()).abs()
    assert (err <= bound).all(), f"param off by {float(err.max())}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
@pytest.mark.parametrize("cautious", [False, True])
def test_lion_matches_reference_bitwise(isa_ops, n, param_dtype, grad_dtype, cautious):
    n = _size(n)
    p, g, m, _ = _data(n, param_dtype, grad_dtype)
    counts = isa_ops.lion_mask_counts([g], [m], 0.9)
    _assert_equal(counts, ref.lion_mask_counts([g], [m], 0.9), "mask counts")
    scales = ref.mask_scales(counts, [max(n, 1)]) if cautious else None
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
    p_ref, m_ref = p.clone(), m.clone()
    ref.lion_apply([p_ref], [g], [m_ref], **hyper)
    isa_ops.lion_apply([p], [g], [m], **hyper)
    _assert_equal(m, m_ref, "exp_avg")
    _assert_equal(p, p_ref, "param")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0 and +0 (a masked negative update leaves p + (+0)) count as different."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
def test_split_cautious_lion_matches_reference_bitwise(isa_ops, n, param_dtype, grad_dtype):
    """The two-pass native cautious Lion (momentum + 2-bit codes, then params from the codes)
    gives the reference's counts, momentum and params bit for bit, signed zeros included."""
    n = _size(n)
    p, g, m, _ = _data(n, param_dtype, grad_dtype)
    g[::5], m[::7] = 0.0, 0.0  # c = 0 and g = 0 entries: masked, update +0
    p[::11] = -0.0  # p + (+0) turns -0 into +0: the zero's sign must come out as the reference's
    p_ref, m_ref = p.clone(), m.clone()
    counts, pending = isa_ops.lion_cautious_begin([p], [g], [m], beta1=0.9, beta2=0.99)
    _assert_equal(counts, ref.lion_mask_counts([g], [m_ref], 0.9), "mask counts")
    scales = ref.mask_scales(counts, [max(n, 1)])
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
    isa_ops.lion_cautious_finish(pending, [p], [g], [m], **hyper)
    ref.lion_apply([p_ref], [g], [m_ref], **hyper)
    _assert_equal(m, m_ref, "exp_avg")
    assert torch.equal(_bits(p), _bits(p_ref)), "param bits"


def test_split_cautious_lion_several_groups_in_flight(ops):
    """Two begins before either finish (two param groups in one step) get separate code
    buffers, and a later step reuses them instead of allocating."""
    gen = torch.Generator().manual_seed(3)
    sizes = [[5, 40000], [17]]
    params = [[torch.randn(n, generator=gen) for n in group] for group in sizes]
    grads = [[torch.randn(n, generator=gen) for n in group] for group in sizes]
    ms = [[torch.randn(n, generator=gen) * 0.1 for n in group] for group in sizes]
    expected_p = [[t.clone() for t in group] for group in params]
    expected_m = [[t.clone() for t in group] for group in ms]
    buffers = []
    for _ in range(2):
        begun = [ops.lion_cautious_begin(p, g, m, beta1=0.9, beta2=0.99) for p, g, m in zip(params, grads, ms)]
        buffers.append({id(pending.buffer) for _, pending in begun})
        assert len(buffers[-1]) == 2
        for (counts, pending), p, g, m, p_ref, m_ref, group in zip(begun, params, grads, ms, expected_p, expected_m, sizes):
            scales = ref.mask_scales(counts, group)
            hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, scales=scales)
            ops.lion_cautious_finish(pending, p, g, m, **hyper)
            ref.lion_apply(p_ref, g, m_ref, **hyper)
    assert buffers[0] == buffers[1]
    for actual, wanted in zip(sum(params, []) + sum(ms, []), sum(expected_p, []) + sum(expected_m, [])):
        _assert_equal(actual, wanted, "after two steps")


def test_split_cautious_lion_falls_back_for_fp64(ops):
    """fp64 params are not the extension's: both phases run the reference, same results."""
    p, g, m = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64), torch.randn(33) * 0.1
    p_ref, m_ref = p.clone(), m.clone()
    counts, pending = ops.lion_cautious_begin([p], [g], [m], beta1=0.9, beta2=0.99)
    scales = ref.mask_scales(counts, [33])
    ops.lion_cautious_finish(pending, [p], [g], [m], lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
    ref.lion_apply([p_ref], [g], [m_ref], lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
    _assert_equal(p, p_ref, "param")
    _assert_equal(m, m_ref, "exp_avg")


def test_several_tensors_per_call_and_zero_entries(isa_ops):
    """Lists mixing sizes and dtypes; exact zeros in m and g (masked: product not > 0)."""
    sizes = [0, 5, 17, 1000]
    params = [torch.randn(n).to(dt) for n, dt in zip(sizes, [torch.float32, torch.bfloat16, torch.float16, torch.float32])]
    grads = [torch.randn(n) for n in sizes]
    grads[3][::3] = 0.0
    exp_avgs = [torch.zeros(n) for n in sizes]
    counts = isa_ops.lion_mask_counts(grads, exp_avgs, 0.9)
    _assert_equal(counts, ref.lion_mask_counts(grads, exp_avgs, 0.9), "counts")
    scales = ref.mask_scales(counts, [max(n, 1) for n in sizes])
    expected = [p.clone() for p in params]
    m_ref = [m.clone() for m in exp_avgs]
    ref.lion_apply(expected, grads, m_ref, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, scales=scales)
    isa_ops.lion_apply(params, grads, exp_avgs, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, scales=scales)
    for actual, wanted in zip(params, expected):
        _assert_equal(actual, wanted, "param")


# ------------------------------------------------------------------------- CAME -------------

LAYOUTS = [
    ((5, 3), 0, 15),  # whole small matrix
    ((5, 3), 4, 13),  # starts and ends mid-row
    ((7, 37), 40, 45),  # inside one row
    ((3, 4, 5, 9), 17, 170),  # batched (conv-like), partial rows at both ends
    ((4, 3, 2, 2), 1, 47),  # conv weight factored over 2x2
    ((300, 200), 123, 59999),  # one large matrix (R*C > tile), mid-row cuts
    ((2, 100, 700), 5000, 139993),  # two large matrices
    ((2000, 3), 0, 6000),  # many rows narrower than a vector
]


def _sum_terms(layout: FactoredLayout) -> tuple[int, int]:
    """Most terms in one row sum (C) and in one column sum (R)."""
    return layout.cols, layout.rows


@pytest.mark.parametrize("shape,start,end", LAYOUTS)
@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES[:3])
def test_came_factored_phases(isa_ops, shape, start, end, param_dtype, grad_dtype):
    layout = FactoredLayout(shape, start, end)
    n = end - start
    p, g, m, _ = _data(n, param_dtype, grad_dtype)
    rows, cols = layout.num_row_factors, layout.num_col_factors
    row_c, col_c = _sum_terms(layout)

    row_sums, col_sums = torch.zeros(rows), torch.zeros(cols)
    row_ref, col_ref = torch.zeros(rows), torch.zeros(cols)
    isa_ops.came_factored_sq_sums([g], [layout], 1e-30, [row_sums], [col_sums])
    ref.came_factored_sq_sums([g], [layout], 1e-30, [row_ref], [col_ref])
    _assert_sum_close(row_sums, row_ref, row_c, "row sums")
    _assert_sum_close(col_sums, col_ref, col_c, "col sums")

    gen = torch.Generator().manual_seed(7)
    factors = CameFactors(layout, torch.rand(rows, generator=gen) + 0.5, torch.rand(cols, generator=gen) + 0.5)
    _assert_sum_close(isa_ops.came_update_sumsq([g], [factors]), ref.came_update_sumsq([g], [factors]), n, "update sumsq")

    clip = torch.tensor([1.7])
    m_ref = m.clone()
    res = (torch.zeros(rows), torch.zeros(cols))
    res_ref = (torch.zeros(rows), torch.zeros(cols))
    counts = isa_ops.came_momentum([g], [m], [factors], clip, beta1=0.9, eps2=1e-16, res_row_sums=[res[0]], res_col_sums=[res[1]])
    counts_ref = ref.came_momentum([g], [m_ref], [factors], clip, beta1=0.9, eps2=1e-16, res_row_sums=[res_ref[0]], res_col_sums=[res_ref[1]])
    _assert_equal(counts, counts_ref, "mask counts")
    _assert_equal(m, m_ref, "exp_avg")
    _assert_sum_close(res[0], res_ref[0], row_c, "residual row sums")
    _assert_sum_close(res[1], res_ref[1], col_c, "residual col sums")

    for scales in (None, ref.mask_scales(counts, [math.prod(shape)])):
        p_native, p_ref = p.clone(), p.clone()
        isa_ops.came_apply([p_native], [g], [m], [factors], lr=1e-3, weight_decay=0.1, scales=scales)
        ref.came_apply([p_ref], [g], [m_ref], [factors], lr=1e-3, weight_decay=0.1, scales=scales)
        _assert_equal(p_native, p_ref, "param")
    _check_came_kept_mask(isa_ops, p, g, m_ref, [factors], clip, [torch.zeros(rows)], [torch.zeros(cols)], math.prod(shape))


def _check_came_kept_mask(ops, p, g, m_start, factors, clip, res_rows, res_cols, numel):
    """The cautious pair (momentum keeping the mask as bits, apply reading the bits instead of g)
    gives came_momentum + came_apply's counts, momentum and params bit for bit."""
    m, m_ref = m_start.clone(), m_start.clone()
    hyper = dict(beta1=0.9, eps2=1e-16)
    counts, pending = ops.came_cautious_begin([g], [m], factors, clip, **hyper, res_row_sums=res_rows, res_col_sums=res_cols)
    ref_rows = [None if t is None else torch.zeros_like(t) for t in res_rows]
    ref_cols = [None if t is None else torch.zeros_like(t) for t in res_cols]
    counts_ref = ref.came_momentum([g], [m_ref], factors, clip, **hyper, res_row_sums=ref_rows, res_col_sums=ref_cols)
    _assert_equal(counts, counts_ref, "kept-mask counts")
    _assert_equal(m, m_ref, "kept-mask exp_avg")
    scales = ref.mask_scales(counts, [numel])
    p_native, p_ref = p.clone(), p.clone()
    ops.came_cautious_finish(pending, [p_native], [g], [m], factors, lr=1e-3, weight_decay=0.1, scales=scales)
    ref.came_apply([p_ref], [g], [m_ref], factors, lr=1e-3, weight_decay=0.1, scales=scales)
    _assert_equal(p_native, p_ref, "kept-mask param")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,start,end", [((300, 200), 0, 60000), ((300, 200), 123, 59999), ((130, 64), 0, 8320), ((2, 100, 700), 5000, 139993)])
def test_came_kept_mask_words_shared_by_row_blocks(isa_ops, threads, shape, start, end):
    """The momentum pass stores a mask word without the atomic OR only when its row block owns the
    whole word. With rows of 200 elements, row blocks meet inside words; with one thread the later
    block completes such a word after the earlier block OR-ed its part in, so storing it would
    lose those bits (and the params would move where the mask says no)."""
    layout = FactoredLayout(shape, start, end)
    p, g, m, _ = _data(end - start, torch.float32, torch.float32)
    gen = torch.Generator().manual_seed(5)
    factors = CameFactors(layout, torch.rand(layout.num_row_factors, generator=gen) + 0.5, torch.rand(layout.num_col_factors, generator=gen) + 0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, cols = layout.num_row_factors, layout.num_col_factors
        _check_came_kept_mask(isa_ops, p, g, m, [factors], torch.tensor([1.3]), [torch.zeros(rows)], [torch.zeros(cols)], math.prod(shape))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("shape,start,end", LAYOUTS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_came_sumsq_folded_into_phase_one(isa_ops, shape, start, end, grad_dtype):
    """Phase 1 with the row state folds phase 2 over whole rows: the sum of squares from the
    folded column sums (+ the partial rows read again) matches the reference's full pass.

    Bound: the reference rounds each term ``((r_i c_j) g)^2`` about 10 times (r_i alone: a division,
    a sqrt and a reciprocal), the folded form ``mean * c_j^2 * g^2 / R_i`` about as often, so
    terms differ by at most ~20 ulps relative; on top of the summation bound (n + 64) ulps that
    stays below (n + 64 + 20) * 2^-24 of the sum."""
    from dist_cautious.optim.came import _ema_, _normalised_rsqrt

    layout = FactoredLayout(shape, start, end)
    n = end - start
    _, g, _, _ = _data(n, torch.float32, grad_dtype)
    gen = torch.Generator().manual_seed(11)
    row_state = torch.rand(layout.num_row_factors, generator=gen) * 1e-2 + 1e-3
    col_state = torch.rand(layout.num_col_factors, generator=gen) * 1e-2 + 1e-3
    row_sums, col_sums = torch.zeros(layout.num_row_factors), torch.zeros(layout.num_col_factors)
    (folded,) = isa_ops.came_factored_sq_sums_begin([g], [layout], 1e-30, [row_sums], [col_sums], row_states=[row_state], beta2=0.999)
    assert folded is not None and folded.shape == col_sums.shape
    _ema_(row_state, 0.999, row_sums, layout.cols)
    _ema_(col_state, 0.999, col_sums, layout.rows)
    row_f, col_f, means = _normalised_rsqrt(row_state, col_state, layout.rows)
    with_fold = isa_ops.came_update_sumsq([g], [CameFactors(layout, row_f, col_f, folded=folded, row_means=means)])
    expected = ref.came_update_sumsq([g], [CameFactors(layout, row_f, col_f)])
    _assert_sum_close(with_fold, expected, n + 20, "folded update sumsq")


# phase 1's row groups: whole runs of 64 rows and shorter ones, groups cut by a matrix's end, by
# a ZeRO cut and by the 64-row column runs, rows narrower than a vector, rows wider than a tile
ROW_GROUP_LAYOUTS = LAYOUTS + [
    ((130, 64), 0, 8320),
    ((3, 70, 33), 40, 6900),
    ((67, 129), 129 * 3 + 5, 67 * 129 - 2),
    ((9, 40000), 0, 360000),
]


@pytest.mark.parametrize("shape,start,end", ROW_GROUP_LAYOUTS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fold", [False, True])
def test_came_phase_one_rows_in_step_are_bitwise_one_row_at_a_time(isa_ops, shape, start, end, grad_dtype, fold):
    """Phase 1 walks whole rows four at a time (and folds a group during the next group's walk):
    row sums, column sums and folded column sums are bit for bit those of the one-row walk, which
    test_came_factored_phases and test_came_sumsq_folded_into_phase_one hold to the reference."""
    layout = FactoredLayout(shape, start, end)
    _, g, _, _ = _data(end - start, torch.float32, grad_dtype)
    row_state = torch.rand(layout.num_row_factors, generator=torch.Generator().manual_seed(3)) * 1e-2 + 1e-3

    def phase_one(rows_in_step):
        isa_ops.module.set_came_sq_rows(rows_in_step)
        try:
            sums = (torch.zeros(layout.num_row_factors), torch.zeros(layout.num_col_factors))
            if not fold:
                isa_ops.came_factored_sq_sums([g], [layout], 1e-30, *([s] for s in sums))
                return sums
            (folded,) = isa_ops.came_factored_sq_sums_begin([g], [layout], 1e-30, *([s] for s in sums), row_states=[row_state], beta2=0.999)
            return (*sums, folded)
        finally:
            isa_ops.module.set_came_sq_rows(4)

    for one, grouped, what in zip(phase_one(1), phase_one(4), ("row sums", "column sums", "folded column sums")):
        assert torch.equal(one.view(torch.int32), grouped.view(torch.int32)), what


def test_came_phase_one_rows_in_step_are_checked(ops):
    for bad in (0, 5):
        with pytest.raises(RuntimeError, match="rows in step must be 1 to 4"):
            ops.module.set_came_sq_rows(bad)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
def test_came_vector_phases(isa_ops, n, param_dtype, grad_dtype):
    n = _size(n)
    p, g, m, v = _data(n, param_dtype, grad_dtype)
    v_ref = v.clone()
    isa_ops.came_vector_second_moment([g], [v], 0.999, 1e-30)
    ref.came_vector_second_moment([g], [v_ref], 0.999, 1e-30)
    _assert_equal(v, v_ref, "exp_avg_sq")
    factors = CameFactors(elementwise=v)
    _assert_sum_close(isa_ops.came_update_sumsq([g], [factors]), ref.came_update_sumsq([g], [factors]), n, "update sumsq")
    clip = torch.tensor([1.3])
    m_ref = m.clone()
    counts = isa_ops.came_momentum([g], [m], [factors], clip, beta1=0.9, eps2=1e-16, res_row_sums=[None], res_col_sums=[None])
    counts_ref = ref.came_momentum([g], [m_ref], [factors], clip, beta1=0.9, eps2=1e-16, res_row_sums=[None], res_col_sums=[None])
    _assert_equal(counts, counts_ref, "mask counts")
    _assert_equal(m, m_ref, "exp_avg")
    for confidence in (CameFactors(), factors):
        for scales in (None, torch.tensor([2.5])):
            p_native, p_ref = p.clone(), p.clone()
            isa_ops.came_apply([p_native], [g], [m], [confidence], lr=1e-3, weight_decay=0.1, scales=scales)
            ref.came_apply([p_ref], [g], [m_ref], [confidence], lr=1e-3, weight_decay=0.1, scales=scales)
            _assert_equal(p_native, p_ref, "param")
    _check_came_kept_mask(isa_ops, p, g, m_ref, [factors], clip, [None], [None], max(n, 1))


def test_came_sums_add_into_existing_buffers(ops):
    """Two fragments of one tensor add their partial sums into the same full-size buffers."""
    shape = (9, 11)
    g = torch.randn(99)
    pieces = [(0, 40), (40, 99)]
    rows, cols = torch.zeros(9), torch.zeros(11)
    for start, end in pieces:
        ops.came_factored_sq_sums([g[start:end]], [FactoredLayout(shape, start, end)], 1e-30, [rows], [cols])
    whole_rows, whole_cols = torch.zeros(9), torch.zeros(11)
    ref.came_factored_sq_sums([g], [FactoredLayout(shape, 0, 99)], 1e-30, [whole_rows], [whole_cols])
    _assert_sum_close(rows, whole_rows, 11, "row sums")
    _assert_sum_close(cols, whole_cols, 9, "col sums")


@pytest.mark.parametrize("beta", [0.999, 0.9])
def test_came_factor_update_matches_reference(ops, beta):
    """The native factor math against the torch ops: the EMA'd row and column state and the
    column factor bit for bit; each matrix's mean within the sum bound of its R terms (torch sums
    in fp32 in its own order, the kernel in double); the row factor bit for bit what torch's ops
    make of the kernel's own means. Runs of several matrices, R from 1 to 70000 and C up to
    70000, sizes that leave vector tails in every loop."""
    runs = [(1, 5, 2), (3, 4, 3), (7, 9, 1), (33, 2, 2), (70000, 2, 1), (2, 70000, 1), (100, 17, 3)]
    native = random_factor_buffers(runs, 3)
    expected = cloned(native)
    ops.came_factor_update(native, beta)
    ref.came_factor_update(expected, beta)
    _assert_equal(native.row_state, expected.row_state, "row state")
    _assert_equal(native.col_state, expected.col_state, "column state")
    _assert_equal(native.col_factor, expected.col_factor, "column factor")
    first = matrix = 0
    for R, _, k in runs:
        _assert_sum_close(native.means[matrix : matrix + k], expected.means[matrix : matrix + k], R, f"means of R={R}")
        state = native.row_state[first : first + R * k].view(k, R)
        row_factor = (state / native.means[matrix : matrix + k].view(k, 1)).rsqrt()
        _assert_equal(native.row_factor[first : first + R * k], row_factor.view(-1), f"row factor of R={R}")
        first, matrix = first + R * k, matrix + k


def test_came_factor_update_in_float64_runs_the_reference(ops):
    assert_float64_factor_update_runs_the_reference(ops, "cpu")


def test_mask_scales_match_reference(ops):
    """Bit for bit (fp32 division, clamp and reciprocal, as torch rounds them), counts from 0
    (clamped at 1e-3) to the whole tensor, one size per tensor."""
    gen = torch.Generator().manual_seed(8)
    sizes = torch.randint(1, 10**7, (1000,), generator=gen).float()
    counts = (torch.rand(1000, generator=gen) * sizes).floor()
    counts[:3] = torch.tensor([0.0, 1.0, 0.0])
    counts[3:6] = sizes[3:6]
    _assert_equal(ops.mask_scales(counts, sizes), ref.mask_scales(counts, sizes), "mask scales")


# ------------------------------------------------------------------------- dispatch ----------


def test_fp64_and_strided_inputs_fall_back_to_the_reference(ops):
    p = torch.randn(20, dtype=torch.float64)
    g = torch.randn(40)[::2]  # not contiguous
    m, v = torch.zeros(20), torch.zeros(20)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    ops.adamw_apply([p], [g], [m], [v], [1], **hyper)
    ref.adamw_apply([p_ref], [g], [m_ref], [v_ref], [1], **hyper)
    _assert_equal(p, p_ref, "fp64 param via the reference")


def test_bad_arguments_raise(ops):
    with pytest.raises(ValueError, match="layout range"):
        ops.came_factored_sq_sums([torch.randn(5)], [FactoredLayout((3, 3), 0, 9)], 1e-30, [torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(RuntimeError, match="lists differ in length"):
        torch.ops.dist_cautious_cpu.adamw_mask_counts([torch.randn(3)], [], 0.1)
    with pytest.raises(RuntimeError, match="not supported|unknown ISA"):
        ops.module.set_isa("sse9")


def test_ops_for_picks_native_and_falls_back_once(ops, monkeypatch, caplog):
    monkeypatch.setenv("DIST_CAUTIOUS_KERNELS", "auto")
    monkeypatch.setattr(kernels, "_loaded", {})
    assert type(kernels.ops_for(torch.device("cpu"))).__name__ == "CpuOps"

    from dist_cautious.kernels import build

    def broken(kind, verbose=False):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(build, "load", broken)
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="dist_cautious"):
        assert kernels.ops_for(torch.device("cpu")) is ref
        assert kernels.ops_for(torch.device("cpu")) is ref
    assert len([r for r in caplog.records if "no compiler" in r.getMessage()]) == 1
    # native after an auto fallback was cached in this process: it must not reuse the fallback
    monkeypatch.setenv("DIST_CAUTIOUS_KERNELS", "native")
    with pytest.raises(RuntimeError, match="no compiler"):
        kernels.ops_for(torch.device("cpu"))
    monkeypatch.setattr(kernels, "_loaded", {})
    with pytest.raises(RuntimeError, match="no compiler"):
        kernels.ops_for(torch.device("cpu"))


@pytest.mark.parametrize("name", ["CautiousAdamW", "CautiousLion", "CAME"])
def test_optimizer_steps_native_vs_reference(ops, monkeypatch, name):
    """Three steps of each optimizer on awkward shapes: native kernels vs the reference path."""
    import dist_cautious.optim as optim

    shapes = [(), (1,), (7,), (5, 3), (4, 3, 2, 2), (33, 17)]
    kwargs = {"CAME": dict(lr=2e-4, cautious=True)}.get(name, dict(lr=1e-3))
    results = []
    for mode in ("reference", "native"):
        monkeypatch.setenv("DIST_CAUTIOUS_KERNELS", mode)
        used = kernels.ops_for(torch.device("cpu"))
        assert (used is ref) == (mode == "reference"), f"{mode}: stepped with {used!r}"  # native really ran
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = getattr(optim, name)(params, **kwargs)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn(param.shape)
            opt.step()
        results.append([param.detach().clone() for param in params])
    for native, wanted in zip(results[1], results[0]):
        torch.testing.assert_close(native, wanted, rtol=1e-5, atol=1e-6)
