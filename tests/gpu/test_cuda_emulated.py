"""The real CUDA kernels, executed on CPU threads, against the torch reference path.

``tests/gpu/cuda_on_cpu`` compiles the shipped ``csrc/cuda`` sources (kernels, launchers and the
binding with all its checks) with the host compiler; ``CudaOps(ext, "cpu")`` is then the whole
CUDA path of ``kernels.ops_for`` on CPU tensors. The test build uses 64 threads per block,
320-element chunks and 2 row passes per factored tile, so the sizes below cross every boundary:
several chunks per tensor and a chunk ending mid-ILP-pass, tensors shorter than a block, many
tensors per launch, factored tiles at every lanes value (1..32), several column tiles, several
matrices in one tile, fragments cut mid-row and mid-tile, bf16 / fp16 params.

Tolerances, with ``u = 2**-24`` (fp32 unit roundoff); every bound is derived, none fitted:
- bitwise where both sides round the same ops the same way: mask counts, the momentum of AdamW
  and Lion (ATen's lerp formula, reproduced op for op), a whole plain Lion step (``-lr * (+-1)``
  is exact, so fused or not the param takes one rounding) and so its bf16 / fp16 stores;
- elementwise results that take up to 4 roundings on each side, some fused on one side and not
  on the other (torch's CPU kernels fuse ``a + alpha*b`` in their vectorised body only): 8u of
  the sum of the magnitudes of the terms; 16u where the kernel uses ``rsqrtf`` (2 ulp on a GPU,
  and the emulation moves it by up to 2 ulp on purpose);
- a sum of ``k`` positive terms in two different orders: ``2 k u`` of the sum, plus the terms'
  own elementwise bound;
- a stepped bf16 / fp16 param: the fp32 bound plus one unit of the param's last place (an fp32
  difference may straddle a rounding boundary), or one subnormal unit near zero.
Mask decisions that rest on an fp32 value within its bound of zero are "ambiguous": counted as
allowed slack and excluded from the param comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

import dist_cautious.optim as optim
from dist_cautious import kernels
from dist_cautious.kernels import cuda_library, reference
from dist_cautious.kernels.cuda_ops import CudaOps
from dist_cautious.kernels.layout import FactoredLayout
from dist_cautious.kernels.reference import CameFactors
from tests.factor_buffers import assert_float64_factor_update_runs_the_reference, cloned, random_factor_buffers
from tests.op_counter import StepRecorder

pytestmark = pytest.mark.cuda_emulated

U = 2.0**-24
PARAM_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
PARAM_FLOOR = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
# With 320-element chunks and 256 elements per ILP pass: tensors shorter than a block (1..63),
# one element either side of a pass and of a chunk, and tensors of several chunks; an empty one.
ELEM_SIZES = [1, 3, 0, 63, 64, 65, 255, 256, 257, 319, 320, 321, 640, 1000, 1601]
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
# (shape, start, end). lanes = smallest power of two >= C/4 (max 32); tile rows = 128 / lanes;
# column tiles of 4 * lanes columns.
FACTORED = [
    ((6, 3, 3), 0, 54),          # lanes 1, six matrices in one tile
    ((2, 140, 4), 3, 1117),      # lanes 1, three row tiles, one straddling two matrices, cut mid-row
    ((70, 7), 10, 480),          # lanes 2, two row tiles, cut mid-row at both ends
    ((5, 9, 13), 20, 580),       # lanes 4, tiles across matrices, cut mid-row mid-tile
    ((40, 30), 45, 1111),        # lanes 8, three row tiles
    ((3, 11, 50), 77, 1600),     # lanes 16
    ((20, 100), 0, 2000),        # lanes 32, five row tiles, whole tensor
    ((9, 300), 150, 2650),       # lanes 32, three column tiles, cut mid-row
    ((2, 3, 260), 100, 1500),    # three column tiles, two matrices in a 4-row tile
    ((4, 30), 35, 39),           # a few elements inside one row
    ((5, 6), 12, 12),            # an empty fragment
]


@pytest.fixture(scope="module")
def ext():
    from tests.gpu.cuda_on_cpu.build import load

    return load()


@pytest.fixture(scope="module")
def ops(ext):
    return CudaOps(ext, device_type="cpu").namespace()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(n: int, gen: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, generator=gen) * scale).to(dtype)


def _clone(tensors):
    return [t.clone() for t in tensors]


def _within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str, exclude=None) -> None:
    """``|actual - expected| <= bound`` elementwise in float64 (NaN equal to NaN), except ``exclude``."""
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    bad = ~(diff <= bound.double()) & ~(a.isnan() & e.isnan())
    if exclude is not None:
        bad &= ~exclude
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} outside the bound; first at {i}: "
                             f"{a[i].item()!r} vs {e[i].item()!r}, bound {bound.double()[i].item()!r}")


def _bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    same = actual.view(torch.int16 if actual.element_size() == 2 else torch.int32) == expected.view(
        torch.int16 if expected.element_size() == 2 else torch.int32)
    same |= actual.isnan() & expected.isnan()
    if not bool(same.all()):
        i = int((~same).nonzero()[0])
        raise AssertionError(f"{what}: {int((~same).sum())}/{same.numel()} differ; first at {i}: {actual[i].item()!r} vs {expected[i].item()!r}")


def _param_bound(expected: torch.Tensor, magnitude: torch.Tensor, dtype, ulps: float) -> torch.Tensor:
    return (PARAM_ULP[dtype] + ulps * U) * magnitude.double() + PARAM_ULP[dtype] * expected.double().abs() + PARAM_FLOOR[dtype]


def _with_zeros(grad: torch.Tensor) -> torch.Tensor:
    """Every 13th gradient entry exactly 0 (a dead unit): ``m * g`` is then 0, which the strict
    mask ``m * g > 0`` must reject."""
    grad[::13] = 0
    return grad


def _elem_case(param_dtype, grad_dtype, seed, sizes=ELEM_SIZES):
    gen = _gen(seed)
    params = [_randn(n, gen, param_dtype) for n in sizes]
    grads = [_with_zeros(_randn(n, gen, grad_dtype, 0.1)) for n in sizes]
    exp_avgs = [_randn(n, gen, scale=0.05) for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=gen) * 1e-2 for n in sizes]
    return params, grads, exp_avgs, exp_avg_sqs


def _scales(counts: torch.Tensor) -> torch.Tensor:
    return reference.mask_scales(counts, [max(n, 1) for n in ELEM_SIZES])


# ---- the emulation itself ------------------------------------------------------------------------
def _halfway_and_edges(fmt: str) -> torch.Tensor:
    """Floats exactly halfway between neighbours of ``fmt`` (ties), one bit either side of them,
    subnormals, the overflow threshold, zeros and infinities."""
    gen = _gen(7)
    if fmt == "bf16":
        high = torch.randint(0, 1 << 16, (20000,), generator=gen, dtype=torch.int64) << 16
        ties = high | 0x8000
    else:
        h = torch.randint(0, 0x7C00, (20000,), generator=gen, dtype=torch.int64).to(torch.int16)
        lo = h.view(torch.float16).double()
        hi = (h + 1).view(torch.float16).double()
        ties = torch.tensor(((lo + hi) / 2).float().view(torch.int32).numpy(), dtype=torch.int64)
    bits = torch.cat([ties, ties + 1, ties - 1, torch.randint(0, 1 << 32, (100000,), generator=gen, dtype=torch.int64)])
    signed = torch.cat([bits, bits | (1 << 31)]) & 0xFFFFFFFF
    values = signed.to(torch.int64).where(signed < (1 << 31), signed - (1 << 32)).to(torch.int32).view(torch.float32)
    extra = torch.tensor([0.0, -0.0, math.inf, -math.inf, 65504.0, 65519.99, 65520.0, 2.0**-25, 2.0**-24, 3 * 2.0**-26,
                          2.0**-14, 3.3895314e38, 3.4028235e38, 1e-40, -1e-45])
    return torch.cat([values, extra]).contiguous()


@pytest.mark.parametrize("fmt,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_conversion_intrinsics_round_like_torch(ext, fmt, dtype):
    """__float2bfloat16_rn / __float2half_rn bit for bit against torch's rounding (NaN: any NaN,
    CUDA's canonical NaN differs from torch's), and back to float exactly."""
    values = _halfway_and_edges(fmt)
    ours = torch.ops.dc_cuda_emu.convert(values, fmt, "rn")
    theirs = values.to(dtype).view(torch.int16)
    nan = values.isnan()
    assert bool((ours[~nan] == theirs[~nan]).all()), int((ours[~nan] != theirs[~nan]).sum())
    assert bool(ours[nan].view(dtype).isnan().all())
    _bitwise(torch.ops.dc_cuda_emu.widen(theirs.contiguous(), fmt), theirs.view(dtype).float(), f"{fmt} widen")
    # The directed modes really are different roundings (a planted mode change is visible).
    for mode in ("rz", "rd", "ru"):
        assert bool((torch.ops.dc_cuda_emu.convert(values, fmt, mode) != ours).any()), mode


def test_syncthreads_with_threads_that_returned_early(ext):
    """Threads >= stay return at once; the rest pass barriers and see each other's adds."""
    for stay in (64, 37, 1):
        out = torch.ops.dc_cuda_emu.early_exit(3, 64, stay, 4)
        assert out.tolist() == [stay * (stay + 1) // 2] * 12, stay
    assert torch.ops.dc_cuda_emu.early_exit(2, 64, 0, 3).tolist() == [-1] * 6


def test_a_missing_syncthreads_gives_wrong_values(ext):
    """Thread `writer` fills shared memory and every thread reads it: with the barrier each reads
    its block's value; without it (a race) the emulation's alternating thread order makes the
    readers that run before the writer see what the previous block left, whichever thread writes."""
    blocks, threads = 4, 64
    expected = (torch.arange(blocks * threads) // threads + 1).tolist()
    for writer in (0, threads - 1, 17):
        assert torch.ops.dc_cuda_emu.broadcast(blocks, threads, writer, True).tolist() == expected, writer
        assert torch.ops.dc_cuda_emu.broadcast(blocks, threads, writer, False).tolist() != expected, writer


def test_a_barrier_that_cannot_complete_is_a_launch_error(ext):
    """Half a warp at __syncthreads, the other half in a full-warp shuffle: a GPU hangs; the
    emulation reports a launch failure (and clears it) instead of hanging the test run."""
    message = torch.ops.dc_cuda_emu.split_barrier(64, 16)
    assert "never reach" in message
    assert torch.ops.dc_cuda_emu.split_barrier(64, 0) == "no error"


def test_warp_shuffles(ext):
    down, xored = torch.ops.dc_cuda_emu.shuffles(2, 64, 5, 6)
    lane = torch.arange(128) % 32
    own = 1000 * ((torch.arange(128) % 64) // 32) + lane
    assert down.tolist() == torch.where(lane + 5 < 32, own + 5, own).tolist()
    assert xored.tolist() == (own - lane + (lane ^ 6)).tolist()


# ---- AdamW and Lion ------------------------------------------------------------------------------
@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
@pytest.mark.parametrize("cautious", [False, True])
def test_adamw(ops, param_dtype, grad_dtype, cautious):
    lr, beta1, beta2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.01
    steps = [1 + i % 7 for i in range(len(ELEM_SIZES))]
    params, grads, ms, vs = _elem_case(param_dtype, grad_dtype, seed=1)
    old_p, old_v = _clone(params), _clone(vs)
    expected_counts = reference.adamw_mask_counts(grads, ms, beta1)
    counts = ops.adamw_mask_counts(grads, ms, beta1)
    _bitwise(counts, expected_counts, "adamw mask counts")
    scales = _scales(expected_counts) if cautious else None
    ref_p, ref_m, ref_v = _clone(params), _clone(ms), _clone(vs)
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, scales=scales)
    ops.adamw_apply(params, grads, ms, vs, steps, **kwargs)
    reference.adamw_apply(ref_p, grads, ref_m, ref_v, steps, **kwargs)
    for i, n in enumerate(ELEM_SIZES):
        g = grads[i].double()
        _bitwise(ms[i], ref_m[i], f"adamw exp_avg [{n}]")
        _within(vs[i], ref_v[i], 8 * U * (old_v[i].double() * beta2 + (1 - beta2) * g * g), f"adamw exp_avg_sq [{n}]")
        bc1, bc2 = 1 - beta1**steps[i], math.sqrt(1 - beta2**steps[i])
        update = ref_m[i].double() / (ref_v[i].double().sqrt() / bc2 + eps)
        scale = float(scales[i]) if cautious else 1.0
        magnitude = old_p[i].double().abs() + lr / bc1 * update.abs() * scale
        _within(params[i], ref_p[i], _param_bound(ref_p[i], magnitude, param_dtype, 8), f"adamw param [{n}] {param_dtype}")


@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
@pytest.mark.parametrize("cautious", [False, True])
def test_lion(ops, param_dtype, grad_dtype, cautious):
    lr, beta1, beta2, wd = 1e-3, 0.9, 0.99, 0.1
    params, grads, ms, _ = _elem_case(param_dtype, grad_dtype, seed=2)
    old_p = _clone(params)
    expected_counts = reference.lion_mask_counts(grads, ms, beta1)
    counts = ops.lion_mask_counts(grads, ms, beta1)
    _bitwise(counts, expected_counts, "lion mask counts")
    scales = _scales(expected_counts) if cautious else None
    ref_p, ref_m = _clone(params), _clone(ms)
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, scales=scales)
    if cautious:
        counts2, pending = ops.lion_cautious_begin(params, grads, ms, beta1=beta1, beta2=beta2)
        _bitwise(counts2, expected_counts, "lion_cautious_begin counts")
        ops.lion_cautious_finish(pending, params, grads, ms, **kwargs)
    else:
        ops.lion_apply(params, grads, ms, **kwargs)
    reference.lion_apply(ref_p, grads, ref_m, **kwargs)
    for i, n in enumerate(ELEM_SIZES):
        _bitwise(ms[i], ref_m[i], f"lion exp_avg [{n}]")
        if not cautious:  # -lr * (+-1 or 0) is exact: one rounding on both sides, then the store
            _bitwise(params[i], ref_p[i], f"lion param [{n}] {param_dtype}")
        else:  # -lr * scale is rounded once more on one side
            magnitude = old_p[i].double().abs() + lr * float(scales[i])
            _within(params[i], ref_p[i], _param_bound(ref_p[i], magnitude, param_dtype, 4), f"lion param [{n}]")


def test_lion_nan_momentum_is_sign_zero(ops):
    """torch.sign(NaN) = 0: a NaN momentum leaves the param to its decay, as on the reference path."""
    n = 700
    params = [torch.ones(n)]
    grads = [torch.full((n,), 0.5)]
    ms = [torch.full((n,), math.nan)]
    ref_p, ref_m = _clone(params), _clone(ms)
    ops.lion_apply(params, grads, ms, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0)
    reference.lion_apply(ref_p, grads, ref_m, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0)
    assert not bool(ref_p[0].isnan().any())
    _bitwise(params[0], ref_p[0], "lion param under a NaN momentum")
    _bitwise(ops.lion_mask_counts(grads, [torch.full((n,), math.nan)], 0.9), torch.zeros(1), "lion counts under NaN")


# ---- CAME ----------------------------------------------------------------------------------------
def _came_case(seed: int, grad_dtype=torch.float32):
    gen = _gen(seed)
    layouts = [FactoredLayout(shape, start, end) for shape, start, end in FACTORED]
    grads = [_with_zeros(_randn(lay.end - lay.start, gen, grad_dtype, 0.1)) for lay in layouts]
    return gen, layouts, grads


def _sum_bound(terms: torch.Tensor, layout: FactoredLayout, ulps_per_term: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/col bounds for sums of the positive ``terms``: order (2 k u) plus each term's own error."""
    rows = torch.zeros(layout.num_row_factors, dtype=torch.float64)
    cols = torch.zeros(layout.num_col_factors, dtype=torch.float64)
    layout.add_row_col_sums(terms.double(), rows, cols)
    k_row, k_col = layout.cols, layout.rows
    return (2 * k_row + ulps_per_term) * U * rows + 1e-45, (2 * k_col + ulps_per_term) * U * cols + 1e-45


def _sq_sums(ops, grads, layouts, eps1=1e-30):
    rows = [torch.zeros(lay.num_row_factors) for lay in layouts]
    cols = [torch.zeros(lay.num_col_factors) for lay in layouts]
    ops.came_factored_sq_sums(grads, layouts, eps1, rows, cols)
    return rows, cols


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_came_factored_sq_sums(ops, grad_dtype):
    _, layouts, grads = _came_case(3, grad_dtype)
    rows, cols = _sq_sums(ops, grads, layouts)
    ref_rows, ref_cols = _sq_sums(reference, grads, layouts)
    for lay, g, r, c, rr, rc in zip(layouts, grads, rows, cols, ref_rows, ref_cols):
        row_bound, col_bound = _sum_bound(g.double() ** 2 + 1e-30, lay, 4)
        _within(r, rr, row_bound, f"sq row sums {lay.shape} [{lay.start}, {lay.end})")
        _within(c, rc, col_bound, f"sq col sums {lay.shape} [{lay.start}, {lay.end})")


def _factors(layouts, gen):
    made = []
    for lay in layouts:
        row = torch.rand(lay.num_row_factors, generator=gen) + 0.5
        col = torch.rand(lay.num_col_factors, generator=gen) + 0.5
        made.append(CameFactors(lay, row, col))
    return made


def _with_vectors(gen, layouts, grads, factors, grad_dtype=torch.float32):
    """Append 1-D fragments: elementwise second moments (several chunks) and identities."""
    sizes = [1, 321, 700, 5]
    vgrads = [_randn(n, gen, grad_dtype, 0.1) for n in sizes]
    vfactors = [CameFactors(elementwise=torch.rand(n, generator=gen) * 1e-2 + 1e-4) if i % 2 == 0 else CameFactors()
                for i, n in enumerate(sizes)]
    return list(grads) + vgrads, list(factors) + vfactors


def _precond(factor: CameFactors) -> torch.Tensor:
    if factor.layout is not None:
        return factor.layout.outer(factor.row.double(), factor.col.double())
    if factor.elementwise is not None:
        return factor.elementwise.double().rsqrt()
    return None


def test_came_vector_second_moment(ops):
    gen = _gen(4)
    sizes = [1, 319, 321, 1601]
    grads = [_randn(n, gen, scale=0.1) for n in sizes]
    vs = [torch.rand(n, generator=gen) * 1e-2 for n in sizes]
    ref_v = _clone(vs)
    old = _clone(vs)
    ops.came_vector_second_moment(grads, vs, 0.999, 1e-30)
    reference.came_vector_second_moment(grads, ref_v, 0.999, 1e-30)
    for g, v, r, o in zip(grads, vs, ref_v, old):
        _within(v, r, 8 * U * (0.999 * o.double() + 0.001 * g.double() ** 2), "came vector second moment")


def test_came_update_sumsq(ops):
    gen, layouts, grads = _came_case(5)
    grads, factors = _with_vectors(gen, layouts, grads, _factors(layouts, gen))
    sums = ops.came_update_sumsq(grads, factors)
    expected = reference.came_update_sumsq(grads, factors)
    assert sums.shape == expected.shape and sums.dtype == torch.float32
    for i, (g, f) in enumerate(zip(grads, factors)):
        p = _precond(f)
        terms = (g.double() if p is None else p * g.double()) ** 2
        # fp32 terms (16u with rsqrt), float64 accumulation on the kernel side, fp32 sums in the
        # reference (2 k u), one final rounding of each side.
        bound = (16 + 2 * g.numel() + 2) * U * terms.sum() + 1e-45
        _within(sums[i : i + 1], expected[i : i + 1], bound.reshape(1), f"came_update_sumsq [{i}]")


@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
@pytest.mark.parametrize("cautious", [False, True])
def test_came_momentum_and_apply(ops, param_dtype, grad_dtype, cautious):
    gen, layouts, grads = _came_case(6, grad_dtype)
    factors = _factors(layouts, gen)
    grads, factors = _with_vectors(gen, layouts, grads, factors, grad_dtype)
    count = len(grads)
    ms = [_randn(g.numel(), gen, scale=0.05) for g in grads]
    old_m = _clone(ms)
    divisors = torch.rand(count, generator=gen) + 1.0
    res = [[torch.zeros(f.layout.num_row_factors) if f.layout else None for f in factors],
           [torch.zeros(f.layout.num_col_factors) if f.layout else None for f in factors]]
    ref_res = [[t.clone() if t is not None else None for t in res[0]], [t.clone() if t is not None else None for t in res[1]]]
    ref_m = _clone(ms)
    kwargs = dict(beta1=0.9, eps2=1e-16)
    counts = ops.came_momentum(grads, ms, factors, divisors, res_row_sums=res[0], res_col_sums=res[1], **kwargs)
    expected_counts = reference.came_momentum(grads, ref_m, factors, divisors, res_row_sums=ref_res[0], res_col_sums=ref_res[1], **kwargs)
    ambiguous = []
    for i, (g, f) in enumerate(zip(grads, factors)):
        p = _precond(f)
        uh = (g.double() if p is None else p * g.double()) / float(divisors[i])
        ulps = 16 if f.elementwise is not None else 8
        m_bound = ulps * U * (0.9 * old_m[i].double().abs() + 0.1 * uh.abs()) + 1e-45
        _within(ms[i], ref_m[i], m_bound, f"came momentum [{i}]")
        ambiguous.append(ref_m[i].double().abs() <= m_bound)
        assert abs(float(counts[i]) - float(expected_counts[i])) <= int(ambiguous[-1].sum()), (i, counts[i], expected_counts[i])
        if f.layout is not None:
            diff = uh - ref_m[i].double()
            # each residual: (uh - m) carries the error of uh and m (m_bound each), squared;
            # then the sums' order bound over the residuals.
            per_term = 2 * diff.abs() * 2 * m_bound + 8 * U * diff**2
            row_bound, col_bound = _sum_bound(diff**2 + 1e-16, f.layout, 4)
            rows_extra = torch.zeros_like(row_bound)
            cols_extra = torch.zeros_like(col_bound)
            f.layout.add_row_col_sums(per_term, rows_extra, cols_extra)
            _within(res[0][i], ref_res[0][i], row_bound + rows_extra, f"came residual row sums [{i}] {f.layout.shape}")
            _within(res[1][i], ref_res[1][i], col_bound + cols_extra, f"came residual col sums [{i}] {f.layout.shape}")
    # The apply phase, on the reference momentum (both sides), with confidence factors.
    params = [_randn(g.numel(), gen, param_dtype) for g in grads]
    old_p, ref_p = _clone(params), _clone(params)
    confidence = [CameFactors(f.layout, torch.rand(f.layout.num_row_factors, generator=gen) + 0.5,
                              torch.rand(f.layout.num_col_factors, generator=gen) + 0.5) if f.layout else CameFactors()
                  for f in factors]
    scales = reference.mask_scales(expected_counts, [max(g.numel(), 1) for g in grads]) if cautious else None
    lr, wd = 1e-2, 0.1
    kept = _clone(ref_m)
    if cautious:
        ops.came_cautious_finish(None, params, grads, kept, confidence, lr=lr, weight_decay=wd, scales=scales)
    else:
        ops.came_apply(params, grads, kept, confidence, lr=lr, weight_decay=wd)
    reference.came_apply(ref_p, grads, ref_m, confidence, lr=lr, weight_decay=wd, scales=scales)
    for i, c in enumerate(confidence):
        _bitwise(kept[i], ref_m[i], "came_apply leaves the momentum")
        p = _precond(c)
        update = ref_m[i].double().abs() * (1.0 if p is None else p) * (float(scales[i]) if cautious else 1.0)
        magnitude = old_p[i].double().abs() + lr * update
        _within(params[i], ref_p[i], _param_bound(ref_p[i], magnitude, param_dtype, 8), f"came param [{i}] {param_dtype}")


def test_came_reductions_repeat_bit_for_bit_and_use_no_float_atomics(ops):
    """CAME's row/column/residual sums and sums of squares in a fixed order: the same inputs give
    the same bits, and no launch uses a floating-point atomic (whose order a GPU does not fix)."""
    gen, layouts, grads = _came_case(8)
    factors = _factors(layouts, gen)
    all_grads, all_factors = _with_vectors(gen, layouts, grads, factors)
    ms = [_randn(g.numel(), gen, scale=0.05) for g in all_grads]
    divisors = torch.rand(len(all_grads), generator=gen) + 1.0
    before = torch.ops.dc_cuda_emu.float_atomics()
    runs = []
    for _ in range(2):
        rows, cols = _sq_sums(ops, grads, layouts)
        sums = ops.came_update_sumsq(all_grads, all_factors)
        m = _clone(ms)
        res = [[torch.zeros(f.layout.num_row_factors) if f.layout else None for f in all_factors],
               [torch.zeros(f.layout.num_col_factors) if f.layout else None for f in all_factors]]
        ops.came_momentum(all_grads, m, all_factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=res[0], res_col_sums=res[1])
        runs.append(rows + cols + [sums] + m + [t for t in res[0] + res[1] if t is not None])
    for a, b in zip(*runs):
        _bitwise(a, b, "a repeated CAME phase")
    assert torch.ops.dc_cuda_emu.float_atomics() == before


# ---- lr and weight decay per tensor: one launch over param groups that differ in them --------------
# Small tensors (the emulation is slow) that still cross a chunk (320) and include an empty one.
# Every tensor has its own lr and weight decay, and tensor 0 does not decay: a kernel that took
# one tensor's decay or -lr for the whole launch changes every other tensor's param.
PT_SIZES = [5, 0, 321, 64, 700]
PT_LRS = [1e-3, 3e-2, 1e-2, 2e-3, 5e-2]
PT_WDS = [0.0, 0.3, 0.01, 0.1, 0.05]
PT_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]


def _pt_case(param_dtype, grad_dtype, seed):
    return _elem_case(param_dtype, grad_dtype, seed, sizes=PT_SIZES)


def _one(scales, i):
    return None if scales is None else scales[i : i + 1]


def _all_bitwise(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        _bitwise(a, e, f"{what} [{i}]")


@pytest.mark.parametrize("param_dtype,grad_dtype", PT_DTYPES)
@pytest.mark.parametrize("cautious", [False, True])
def test_adamw_lr_and_weight_decay_per_tensor(ops, param_dtype, grad_dtype, cautious):
    """One call with per-tensor lr / weight decay lands on the bits of one call per tensor with
    its scalars, and matches the reference given the same lists."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    steps = [1, 4, 2, 7, 3]
    params, grads, ms, vs = _pt_case(param_dtype, grad_dtype, seed=11)
    counts = reference.adamw_mask_counts(grads, ms, beta1)
    scales = reference.mask_scales(counts, [max(n, 1) for n in PT_SIZES]) if cautious else None
    old_p, old_v = _clone(params), _clone(vs)
    one = [_clone(params), _clone(ms), _clone(vs)]
    ref = [_clone(params), _clone(ms), _clone(vs)]
    common = dict(beta1=beta1, beta2=beta2, eps=eps)
    ops.adamw_apply(params, grads, ms, vs, steps, lr=PT_LRS, weight_decay=PT_WDS, scales=scales, **common)
    for i in range(len(PT_SIZES)):
        ops.adamw_apply([one[0][i]], [grads[i]], [one[1][i]], [one[2][i]], [steps[i]], lr=PT_LRS[i], weight_decay=PT_WDS[i],
                        scales=_one(scales, i), **common)
    reference.adamw_apply(ref[0], grads, ref[1], ref[2], steps, lr=PT_LRS, weight_decay=PT_WDS, scales=scales, **common)
    _all_bitwise(params, one[0], "adamw param, one call vs one per tensor")
    _all_bitwise(ms, one[1], "adamw exp_avg, one call vs one per tensor")
    _all_bitwise(vs, one[2], "adamw exp_avg_sq, one call vs one per tensor")
    for i, n in enumerate(PT_SIZES):
        lr, g = PT_LRS[i], grads[i].double()
        _bitwise(ms[i], ref[1][i], f"adamw exp_avg [{n}]")
        _within(vs[i], ref[2][i], 8 * U * (old_v[i].double() * beta2 + (1 - beta2) * g * g), f"adamw exp_avg_sq [{n}]")
        bc1, bc2 = 1 - beta1**steps[i], math.sqrt(1 - beta2**steps[i])
        update = ref[1][i].double() / (ref[2][i].double().sqrt() / bc2 + eps)
        magnitude = old_p[i].double().abs() + lr / bc1 * update.abs() * (float(scales[i]) if cautious else 1.0)
        _within(params[i], ref[0][i], _param_bound(ref[0][i], magnitude, param_dtype, 8), f"adamw param [{n}] lr {lr} wd {PT_WDS[i]}")


@pytest.mark.parametrize("param_dtype,grad_dtype", PT_DTYPES)
@pytest.mark.parametrize("cautious", [False, True])
def test_lion_lr_and_weight_decay_per_tensor(ops, param_dtype, grad_dtype, cautious):
    """lion_apply, and the cautious pair (begin, then lion_cautious_finish), with per-tensor lr /
    weight decay: bit for bit one call per tensor with its scalars; plain Lion also bit for bit
    the reference given the same lists."""
    beta1, beta2 = 0.9, 0.99
    params, grads, ms, _ = _pt_case(param_dtype, grad_dtype, seed=12)
    old_p = _clone(params)
    one_p, one_m = _clone(params), _clone(ms)
    ref_p, ref_m = _clone(params), _clone(ms)
    scales = None
    if cautious:
        counts, pending = ops.lion_cautious_begin(params, grads, ms, beta1=beta1, beta2=beta2)
        scales = reference.mask_scales(counts, [max(n, 1) for n in PT_SIZES])
        ops.lion_cautious_finish(pending, params, grads, ms, lr=PT_LRS, beta1=beta1, beta2=beta2, weight_decay=PT_WDS, scales=scales)
        for i in range(len(PT_SIZES)):
            _, one_pending = ops.lion_cautious_begin([one_p[i]], [grads[i]], [one_m[i]], beta1=beta1, beta2=beta2)
            ops.lion_cautious_finish(one_pending, [one_p[i]], [grads[i]], [one_m[i]], lr=PT_LRS[i], beta1=beta1, beta2=beta2,
                                     weight_decay=PT_WDS[i], scales=scales[i : i + 1])
        reference.lion_cautious_finish(None, ref_p, grads, ref_m, lr=PT_LRS, beta1=beta1, beta2=beta2, weight_decay=PT_WDS, scales=scales)
    else:
        ops.lion_apply(params, grads, ms, lr=PT_LRS, beta1=beta1, beta2=beta2, weight_decay=PT_WDS)
        for i in range(len(PT_SIZES)):
            ops.lion_apply([one_p[i]], [grads[i]], [one_m[i]], lr=PT_LRS[i], beta1=beta1, beta2=beta2, weight_decay=PT_WDS[i])
        reference.lion_apply(ref_p, grads, ref_m, lr=PT_LRS, beta1=beta1, beta2=beta2, weight_decay=PT_WDS)
    _all_bitwise(params, one_p, "lion param, one call vs one per tensor")
    _all_bitwise(ms, one_m, "lion exp_avg, one call vs one per tensor")
    _all_bitwise(ms, ref_m, "lion exp_avg vs reference")
    if not cautious:  # -lr * (+-1 or 0) is exact: one rounding on both sides (test_lion)
        _all_bitwise(params, ref_p, "lion param vs reference")
    else:
        for i, n in enumerate(PT_SIZES):
            magnitude = old_p[i].double().abs() + PT_LRS[i] * float(scales[i])
            _within(params[i], ref_p[i], _param_bound(ref_p[i], magnitude, param_dtype, 4), f"lion param [{n}] lr {PT_LRS[i]}")


# Factored fragments (lanes 1 and 4, several matrices per tile, cut mid-row, three column tiles,
# an empty one) and 1-D ones (elementwise second moment, identity), in one call.
PT_FACTORED = [((6, 3, 3), 0, 54), ((5, 6), 12, 12), ((5, 9, 13), 20, 300), ((2, 3, 260), 100, 900)]
PT_VECTOR = [1, 321, 5]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cautious", [False, True])
def test_came_apply_lr_and_weight_decay_per_tensor(ops, param_dtype, cautious):
    """came_apply / came_cautious_finish over factored and 1-D fragments at once (two launches),
    per-tensor lr / weight decay: bit for bit one call per tensor with its scalars, and the
    reference given the same lists within the bounds of test_came_momentum_and_apply."""
    gen = _gen(13)
    layouts = [FactoredLayout(shape, start, end) for shape, start, end in PT_FACTORED]
    confidence = [CameFactors(lay, torch.rand(lay.num_row_factors, generator=gen) + 0.5,
                              torch.rand(lay.num_col_factors, generator=gen) + 0.5) for lay in layouts]
    confidence += [CameFactors(elementwise=torch.rand(n, generator=gen) * 1e-2 + 1e-4) if i % 2 == 0 else CameFactors()
                   for i, n in enumerate(PT_VECTOR)]
    sizes = [lay.end - lay.start for lay in layouts] + PT_VECTOR
    # factored and 1-D fragments interleaved, so each launch's tensors sit at scattered positions
    order = [0, 4, 1, 2, 5, 3, 6]
    confidence, sizes = [confidence[i] for i in order], [sizes[i] for i in order]
    count = len(sizes)
    lrs = [1e-3 * (i + 1) ** 1.5 for i in range(count)]
    wds = [0.0] + [0.05 * i for i in range(1, count)]
    params = [_randn(n, gen, param_dtype) for n in sizes]
    grads = [_with_zeros(_randn(n, gen, scale=0.1)) for n in sizes]
    ms = [_randn(n, gen, scale=0.05) for n in sizes]
    counts = torch.tensor([float((m * g > 0).sum()) for m, g in zip(ms, grads)])
    scales = reference.mask_scales(counts, [max(n, 1) for n in sizes]) if cautious else None
    old_p, one_p, ref_p = _clone(params), _clone(params), _clone(params)
    kept = _clone(ms)
    if cautious:
        ops.came_cautious_finish(None, params, grads, kept, confidence, lr=lrs, weight_decay=wds, scales=scales)
        for i in range(count):
            ops.came_cautious_finish(None, [one_p[i]], [grads[i]], [ms[i]], [confidence[i]], lr=lrs[i], weight_decay=wds[i],
                                     scales=scales[i : i + 1])
        reference.came_cautious_finish(None, ref_p, grads, _clone(ms), confidence, lr=lrs, weight_decay=wds, scales=scales)
    else:
        ops.came_apply(params, grads, kept, confidence, lr=lrs, weight_decay=wds)
        for i in range(count):
            ops.came_apply([one_p[i]], [grads[i]], [ms[i]], [confidence[i]], lr=lrs[i], weight_decay=wds[i])
        reference.came_apply(ref_p, grads, _clone(ms), confidence, lr=lrs, weight_decay=wds)
    _all_bitwise(kept, ms, "came_apply leaves the momentum")
    _all_bitwise(params, one_p, "came param, one call vs one per tensor")
    for i, c in enumerate(confidence):
        p = _precond(c)
        update = ms[i].double().abs() * (1.0 if p is None else p) * (float(scales[i]) if cautious else 1.0)
        magnitude = old_p[i].double().abs() + lrs[i] * update
        _within(params[i], ref_p[i], _param_bound(ref_p[i], magnitude, param_dtype, 8), f"came param [{i}] lr {lrs[i]} wd {wds[i]}")


def test_per_tensor_scalars_are_rounded_like_separate_calls(ops):
    """A per-tensor list equal to one value gives the bits of that value as a scalar: the binding
    rounds each list entry to fp32 exactly as it rounds the scalar."""
    params, grads, ms, vs = _pt_case(torch.float32, torch.float32, seed=14)
    lists = [_clone(params), _clone(ms), _clone(vs)]
    kwargs = dict(beta1=0.9, beta2=0.999, eps=1e-8)
    ops.adamw_apply(params, grads, ms, vs, [3] * len(PT_SIZES), lr=0.1 / 3, weight_decay=0.7, **kwargs)
    ops.adamw_apply(lists[0], grads, lists[1], lists[2], [3] * len(PT_SIZES), lr=[0.1 / 3] * len(PT_SIZES),
                    weight_decay=[0.7] * len(PT_SIZES), **kwargs)
    _all_bitwise(lists[0] + lists[1] + lists[2], params + ms + vs, "adamw, list of one value vs the scalar")


# ---- the binding's checks ------------------------------------------------------------------------
def test_binding_rejects_out_of_range_indices(ext):
    g = [torch.randn(10), torch.randn(5)]
    m = [torch.randn(10), torch.randn(5)]
    counts = torch.zeros(2, dtype=torch.int64)
    divisors = torch.ones(2)
    with pytest.raises(RuntimeError, match="out_index"):
        ext.came_vector_momentum(g, m, [torch.rand(10), torch.rand(5)], [True, True], [0, 2], divisors, 0.9, 0.1, counts)
    with pytest.raises(RuntimeError, match="out_index"):
        ext.came_vector_momentum(g, m, [torch.rand(10), torch.rand(5)], [True, True], [0, -1], divisors, 0.9, 0.1, counts)
    with pytest.raises(RuntimeError, match="out_index"):
        ext.came_vector_sumsq(g, [torch.rand(10), torch.rand(5)], [True, True], [0, 5], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out_index"):
        ext.came_vector_apply(g, g, m, [torch.rand(10), torch.rand(5)], [True, True], [0, 3], [1.0, 1.0], [-0.1, -0.1], torch.ones(2), 2)
    grads = [torch.randn(12)]
    with pytest.raises(RuntimeError, match="out_index"):
        ext.came_factored_sumsq(grads, [0], [1], [3], [4], [torch.rand(3)], [torch.rand(4)], [1], torch.zeros(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out_index"):
        ext.came_factored_momentum(grads, [torch.randn(12)], [0], [1], [3], [4], [torch.rand(3)], [torch.rand(4)], [torch.zeros(3)],
                                   [torch.zeros(4)], [3], torch.ones(1), 0.9, 0.1, 1e-16, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="outside"):
        ext.came_factored_sq_sums(grads, [1], [1], [3], [4], [torch.zeros(3)], [torch.zeros(4)], 1e-30)
    with pytest.raises(RuntimeError, match="outside"):
        ext.came_factored_sq_sums(grads, [-2], [1], [3], [4], [torch.zeros(3)], [torch.zeros(4)], 1e-30)
    with pytest.raises(RuntimeError, match="tensors|length"):
        ext.came_vector_sumsq(g, [torch.rand(10)], [True], [0, 1], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="elements"):
        ext.adamw_apply(g, g, m, [torch.rand(10), torch.rand(4)], [-0.1, -0.1], [0.5, 0.5], [1.0, 1.0], 0.1, 0.999, 0.001, 1e-8, None)
    # per-tensor lr / weight decay: one value per tensor of the call, or the call is refused
    with pytest.raises(RuntimeError, match="decays"):
        ext.adamw_apply(g, g, m, [torch.rand(10), torch.rand(5)], [-0.1, -0.1], [0.5, 0.5], [1.0], 0.1, 0.999, 0.001, 1e-8, None)
    with pytest.raises(RuntimeError, match="neg_lrs"):
        ext.lion_apply(g, g, m, [1.0, 1.0], 0.1, 0.01, [-0.1], None)
    with pytest.raises(RuntimeError, match="decays"):
        ext.came_vector_apply(g, g, m, [torch.rand(10), torch.rand(5)], [True, True], [0, 1], [1.0, 1.0, 1.0], [-0.1, -0.1], None, 2)
    with pytest.raises(RuntimeError, match="neg_lrs"):
        ext.came_factored_apply(grads, grads, [torch.randn(12)], [0], [1], [3], [4], [torch.rand(3)], [torch.rand(4)], [0], [1.0], [],
                                None, 1)


# ---- the two routes to the kernels ---------------------------------------------------------------
ROUTE_CASES = {
    "CautiousAdamW": lambda ps: optim.CautiousAdamW(ps, lr=1e-2, weight_decay=0.1),
    "CAME, cautious": lambda ps: optim.CAME(ps, lr=1e-2, cautious=True, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(ROUTE_CASES))
def test_direct_and_dispatched_routes_step_identically(ops, name):
    """Outside any dispatch mode ``CudaOps`` calls the extension's functions straight; inside one
    it goes through ``torch.ops.dist_cautious`` (kernels/routing.py). Whole optimizer steps on the
    real sources land on the same bits either way, and the mode does see the custom ops."""
    finals = []
    for inside_mode in (False, True):
        gen = _gen(5)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(7,), (5, 3), (4, 3, 2, 2)]]
        optimizer = ROUTE_CASES[name](params)
        with kernels.ops_override("cpu", ops):
            for _ in range(2):
                for param in params:
                    param.grad = torch.randn(param.shape, generator=gen)
                if inside_mode:
                    with StepRecorder() as recorder:
                        optimizer.step()
                    assert recorder.custom_ops(cuda_library.NAMESPACE), "no dist_cautious op dispatched inside the mode"
                else:
                    optimizer.step()
        finals.append([param.detach().clone() for param in params])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


# ---- whole steps: param groups that differ in lr / weight decay, one kernel call per phase ---------
GROUP_CASES = {
    "CautiousAdamW": lambda groups: optim.CautiousAdamW(groups, lr=1e-3),
    "CautiousLion": lambda groups: optim.CautiousLion(groups, lr=1e-4),
    "CautiousLion, cautious=False": lambda groups: optim.CautiousLion(groups, lr=1e-4, cautious=False),
    "CAME, cautious": lambda groups: optim.CAME(groups, lr=2e-4, cautious=True),
    "CAME": lambda groups: optim.CAME(groups, lr=2e-4),
}
GROUP_SHAPES = [(6, 5), (5,), (2, 3, 4), (7,), (4, 4)]
#: positions in GROUP_SHAPES and options per group; the first decays nothing
GROUP_SPLIT = [([1, 3], {"weight_decay": 0.0}), ([0, 2], {"lr": 3e-3, "weight_decay": 0.1}), ([4], {"lr": 7e-4, "weight_decay": 0.05})]
APPLY_OPS = {"adamw_apply", "lion_apply", "came_factored_apply", "came_vector_apply"}


@pytest.mark.parametrize("name", list(GROUP_CASES))
def test_param_groups_of_different_lr_and_decay_step_in_one_kernel_call(ops, name):
    """On the CUDA path (the real sources, emulated), a decay / no-decay split steps each apply
    kernel once over all groups, and lands on the bits of one optimizer per group."""

    def run(together: bool):
        gen = _gen(9)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in GROUP_SHAPES]
        groups = [{"params": [params[i] for i in positions], **options} for positions, options in GROUP_SPLIT]
        optimizers = [GROUP_CASES[name](groups)] if together else [GROUP_CASES[name]([group]) for group in groups]
        calls = []
        with kernels.ops_override("cpu", ops):
            for step in range(2):
                for param in params:
                    param.grad = torch.randn(param.shape, generator=gen)
                for optimizer in optimizers:
                    if together and step == 1:  # the second step runs on the kept plan
                        with StepRecorder() as recorder:
                            optimizer.step()
                        calls = [op for op, _ in recorder.custom_ops(cuda_library.NAMESPACE)]
                    else:
                        optimizer.step()
        return params, calls

    together, calls = run(True)
    apart, _ = run(False)
    for index, (a, b) in enumerate(zip(together, apart)):
        _bitwise(a.detach().reshape(-1), b.detach().reshape(-1), f"{name}: param {index} {GROUP_SHAPES[index]} vs its own optimizer")
    applied = [op for op in calls if op in APPLY_OPS]
    assert applied and len(applied) == len(set(applied)), f"{name}: apply kernels per step {applied}"


# ---- CAME factor math: came_factor_update (csrc/cuda/came_factors.cu) ------------------------------
# (R, C, matrices) in row order. Warp tasks at every group width (R = 1, 2, 3, 5, 7, 17, 32:
# several matrices per warp, a partial last task, 70 matrices of one row), block matrices just
# over the warp limit (R = 33), of one leaf pass (100) and of several (2500, 70000: rows past
# 1024 fold into the leaves), C = 70000 columns (many grid-stride column blocks), the two paths
# interleaved in the run order; an empty run.
FACTOR_RUNS = [(1, 5, 70), (3, 4, 3), (33, 2, 2), (7, 9, 1), (32, 3, 5), (70000, 2, 1), (2, 70000, 1), (4, 6, 0), (100, 17, 3),
               (5, 3, 13), (2500, 4, 2), (17, 6, 4)]
LEAVES = 1024  # came_factors.cu: kLeaves


def _fixed_order_means(by_matrix: torch.Tensor) -> torch.Tensor:
    """The kernel's documented order for the means of the rows of each matrix (k, R): row i into
    float64 leaf i % 1024 in increasing order, then neighbours added level by level; fp32(sum / R)."""
    k, R = by_matrix.shape
    passes = -(-R // LEAVES)
    padded = torch.zeros(k, passes * LEAVES, dtype=torch.float64)
    padded[:, :R] = by_matrix.double()
    leaves = torch.zeros(k, LEAVES, dtype=torch.float64)
    for chunk in padded.view(k, passes, LEAVES).unbind(1):
        leaves += chunk
    while leaves.shape[1] > 1:
        leaves = leaves[:, 0::2] + leaves[:, 1::2]
    return (leaves[:, 0] / R).float()


@pytest.mark.parametrize("beta", [0.999, 0.9])
def test_came_factor_update(ext, ops, beta):
    """The kernel against the torch ops (reference.came_factor_update) on the same inputs: row and
    column state bit for bit (IEEE division, rounded product, one fused multiply-add, as torch's
    CUDA mul_ / add_ with alpha); each mean bit for bit the documented fixed order (whichever path
    computed it: this checks the values summed and the division; the order itself only moves the
    last bits of a float64 sum of fp32 values, which the final fp32 rounding almost always hides),
    and within the sum bound of torch's fp32 mean; the factors bit for bit the
    emulation's rsqrtf of what torch's ops divide (the right value reaches rsqrtf), and within
    8u of torch's CPU rsqrt: the emulated rsqrtf is correctly rounded, then moved up to 2 ulp (4u)
    on purpose, and torch's CPU rsqrt rounds sqrt and 1/x (1.5u). On a GPU, where rsqrtf is the
    instruction torch's own CUDA rsqrt uses, tests/gpu/test_cuda_kernels.py checks bit for bit."""
    native = random_factor_buffers(FACTOR_RUNS, 3)
    expected = cloned(native)
    atomics = torch.ops.dc_cuda_emu.float_atomics()
    ops.came_factor_update(native, beta)
    reference.came_factor_update(expected, beta)
    assert torch.ops.dc_cuda_emu.float_atomics() == atomics, "came_factor_update used float atomics"
    _bitwise(native.row_state, expected.row_state, "row state")
    _bitwise(native.col_state, expected.col_state, "column state")
    _bitwise(native.col_factor, torch.ops.dc_cuda_emu.rsqrtf(expected.col_state), "column factor vs rsqrtf(column state)")
    _within(native.col_factor, expected.col_factor, 8 * U * expected.col_factor.double().abs(), "column factor vs torch.rsqrt")
    first = matrix = 0
    for R, _, k in FACTOR_RUNS:
        rows, means = slice(first, first + R * k), slice(matrix, matrix + k)
        by_matrix = native.row_state[rows].view(k, R)
        _bitwise(native.means[means], _fixed_order_means(by_matrix), f"means of R={R} vs the fixed order")
        ref_means = expected.means[means].double()
        _within(native.means[means], expected.means[means], (R + 64) * U * ref_means.abs(), f"means of R={R} vs torch.mean")
        divided = (by_matrix / native.means[means].view(k, 1)).reshape(-1)
        _bitwise(native.row_factor[rows], torch.ops.dc_cuda_emu.rsqrtf(divided), f"row factor of R={R} vs rsqrtf(state / mean)")
        _within(native.row_factor[rows], divided.rsqrt(), 8 * U * divided.rsqrt().double(), f"row factor of R={R} vs torch.rsqrt")
        first, matrix = first + R * k, matrix + k


def test_came_factor_update_in_float64_runs_the_reference(ops):
    assert_float64_factor_update_runs_the_reference(ops, "cpu")


def test_came_factor_update_without_rows_or_columns(ext):
    """No factored matrix in the segment: nothing to do, nothing launched, no table."""
    empty = torch.zeros(0)
    ext.came_factor_update(empty, empty, empty, empty, empty, empty, [], [], 0.9, 0.1, empty, empty, empty)
    ext.came_factor_update(empty, empty, empty, empty, empty, empty, [3], [0], 0.9, 0.1, empty, empty, empty)


def test_came_factor_update_binding_checks(ext):
    b = random_factor_buffers([(3, 4, 2)], 5)
    args = [b.row_state, b.col_state, b.row_sums, b.col_sums, b.row_counts, b.col_counts]
    outs = [b.row_factor, b.col_factor, b.means]
    with pytest.raises(RuntimeError, match="whole matrices"):
        ext.came_factor_update(*args, [4], [6], 0.9, 0.1, *outs)
    with pytest.raises(RuntimeError, match="cover"):
        ext.came_factor_update(*args, [3], [3], 0.9, 0.1, *outs)
    with pytest.raises(RuntimeError, match="runs"):
        ext.came_factor_update(*args, [3, 3], [6], 0.9, 0.1, *outs)
    with pytest.raises(RuntimeError, match="means"):
        ext.came_factor_update(*args, [3], [6], 0.9, 0.1, b.row_factor, b.col_factor, torch.empty(3))
    with pytest.raises(RuntimeError, match="float32"):
        ext.came_factor_update(*args[:5], b.col_counts.double(), [3], [6], 0.9, 0.1, *outs)
    with pytest.raises(RuntimeError, match="column factor"):
        ext.came_factor_update(*args, [3], [6], 0.9, 0.1, b.row_factor, torch.empty(7), b.means)


# The per-tensor step scalars (step_scalars.cu): one value per tensor, grid-stride over 64-thread
# blocks here, so lengths below, at and across block boundaries, up to 1000 (16 blocks).
SCALAR_LENGTHS = [1, 2, 63, 64, 65, 129, 1000]


def _mask_case(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sizes up to 2**27 (not all exact in fp32, as a step's are not), counts in [0, size], and
    at fixed spots: count 0 (clamped), count == size, a mean just under and just over 1e-3,
    a NaN count."""
    sizes = torch.randint(1, 2**27, (n,), generator=gen).float()
    counts = (torch.rand(n, generator=gen) * sizes).floor()
    special = [(0, 0.0), (1, None), (2, "below"), (3, "above"), (4, float("nan"))]
    for index, value in special:
        if index >= n:
            break
        if value is None:
            counts[index] = sizes[index]
        elif value == "below":
            sizes[index], counts[index] = 4000.0, 3.0
        elif value == "above":
            sizes[index], counts[index] = 4000.0, 5.0
        else:
            counts[index] = value
    return counts, sizes


@pytest.mark.parametrize("n", SCALAR_LENGTHS)
def test_mask_scales(ext, ops, n):
    """Bit for bit torch's ops (reference.mask_scales): the emulated IEEE division and clamp
    round as torch's CPU ops do, and torch's CPU reciprocal is an IEEE 1 / x, as its CUDA one."""
    counts, sizes = _mask_case(n, _gen(20 + n))
    scales = ops.mask_scales(counts, sizes)
    _bitwise(scales, reference.mask_scales(counts, sizes), f"mask scales of {n} tensors")
    _bitwise(ext.mask_scales(counts, sizes), scales, "the binding called directly")
    if n > 4:
        assert scales[0].item() == (1.0 / torch.tensor(1e-3)).item() and scales[1].item() == 1.0  # fp32 1 / fp32(1e-3)
        assert bool(scales[4].isnan()) and scales[2].item() == scales[0].item() and scales[3].item() < scales[0].item()


def _clip_case(n: int, gen: torch.Generator, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS values around the threshold (log-uniform over [d/16, 16 d]: divisors below 1, clamped,
    and above), and at fixed spots: sumsq 0, NaN, inf, a divisor of exactly 1."""
    sizes = torch.randint(1, 2**22, (n,), generator=gen).float()
    rms = threshold * torch.exp2((torch.rand(n, generator=gen) - 0.5) * 8)
    sumsq = (rms.double().square() * sizes.double()).float()
    for index, value in enumerate([0.0, float("nan"), float("inf")]):
        if index < n:
            sumsq[index] = value
    if n > 3:
        sizes[3], sumsq[3] = 4.0, 4.0 * threshold * threshold
    return sumsq, sizes.sqrt()


# d = 1.1: fp32(1 / d) in double differs from 1.0f / fp32(d), so a reciprocal formed another way fails
@pytest.mark.parametrize("threshold", [1.0, 1.1, 3.0])
@pytest.mark.parametrize("n", SCALAR_LENGTHS)
def test_came_clip_divisors(ext, ops, n, threshold):
    """Bit for bit torch's CUDA formula computed with torch's CPU ops from correctly rounded
    primitives: the square root as a float64 root rounded to fp32 (the correctly rounded fp32
    root, which the kernel's sqrt.rn and torch's CUDA sqrtf are; torch's CPU sqrt is MKL's, up to
    0.75 ulp off), then the IEEE division, then the product by fp32(1 / fp32(d)) (torch's CUDA
    division by a Python scalar; its CPU one divides), then the clamp. Against the reference on
    the CPU (torch's own ops), within the two roundings that differ: 4u of the divisor."""
    sumsq, sqrt_sizes = _clip_case(n, _gen(40 + n), threshold)
    divisors = ops.came_clip_divisors(sumsq, sqrt_sizes, threshold)
    inv = float(torch.tensor(1.0 / float(torch.tensor(threshold, dtype=torch.float32)), dtype=torch.float32))
    expected = (sumsq.double().sqrt().float() / sqrt_sizes * inv).clamp(min=1.0)
    _bitwise(divisors, expected, f"clip divisors of {n} tensors, d={threshold}")
    _bitwise(ext.came_clip_divisors(sumsq, sqrt_sizes, threshold), divisors, "the binding called directly")
    ref = reference.came_clip_divisors(sumsq, sqrt_sizes, threshold)
    _within(divisors, ref, 4 * U * ref.double().abs(), f"clip divisors of {n} tensors vs torch's CPU ops", exclude=ref.isinf() & (divisors == ref))
    assert bool((divisors >= 1).all() | divisors.isnan().any())
    if n > 3:
        assert divisors[0].item() == 1.0 and bool(divisors[1].isnan()) and divisors[2].item() == math.inf and divisors[3].item() == 1.0
        assert bool((divisors[4:] > 1).any()) and bool((divisors[4:] == 1).any()), "no divisor on one side of the clamp"


def test_step_scalars_binding_checks(ext):
    values, sizes = torch.rand(5), torch.full((5,), 3.0)
    with pytest.raises(RuntimeError, match="expected 5"):
        ext.mask_scales(values, torch.ones(4))
    with pytest.raises(RuntimeError, match="float32"):
        ext.came_clip_divisors(values, sizes.double(), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.mask_scales(torch.rand(10)[::2], sizes)
    with pytest.raises(RuntimeError, match="vector"):
        ext.came_clip_divisors(torch.rand(2, 2), torch.ones(4), 1.0)
    assert ext.mask_scales(torch.zeros(0), torch.zeros(0)).shape == (0,)
