"""``cuda_ops``' wiring, checked on the CPU: the real Python wrapper over an emulation of the binding.

``cuda_ops.CudaOps`` turns the reference signatures into the binding's calls (argument order,
factored / 1-D partitions, ``out_index`` slots, int64 count and float64 sum buffers, per-tensor
scalars). ``binding_emulator.BindingEmulator`` has the binding's names, signatures and checks and
computes what the kernels compute, with torch ops; so these tests run in CI without a GPU and fail
on any mis-wired argument. The kernels' own arithmetic is checked on a GPU by test_cuda_kernels.py.

Tolerance: the emulator and the reference apply the same fp32 ops, a few in another order
(``p + alpha * (m / d)`` vs ``addcdiv``), so results agree within 8 fp32 roundings (8u) of the
operands' magnitude; the mask counts agree exactly (both compute ``m_new`` with the same torch op).
"""

from __future__ import annotations

import pytest
import torch

from dist_cautious.kernels import cuda_library, reference
from dist_cautious.kernels.cuda_ops import CudaOps
from dist_cautious.kernels.layout import FactoredLayout
from dist_cautious.kernels.reference import CameFactors

from tests.gpu.binding_emulator import BindingEmulator
from tests.op_counter import StepRecorder

U = 2.0**-24
SIZES = [1, 3, 7, 1023, 4099]
FACTORED = [((5, 3), 0, 15), ((4, 3, 2, 2), 0, 48), ((7, 300), 150, 1900), ((3, 100, 5), 123, 1401), ((6, 5, 3, 3), 5, 266)]
VECTOR = [1, 9, 301]


@pytest.fixture
def ops():
    return CudaOps(BindingEmulator(), device_type="cpu").namespace()


def _close(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, what: str, ulps: float = 8.0) -> None:
    bound = ulps * U * magnitude.double() + torch.finfo(torch.float32).tiny
    diff = (actual.double() - expected.double()).abs()
    assert bool((diff <= bound).all()), f"{what}: max excess {float((diff - bound).max())}"


def _case(sizes, param_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(param_dtype) for n in sizes]
    grads = [(torch.randn(n, generator=gen) * 0.1).to(param_dtype) for n in sizes]
    exp_avgs = [torch.randn(n, generator=gen) * 0.05 for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=gen) * 1e-2 for n in sizes]
    return params, grads, exp_avgs, exp_avg_sqs


def _clone(tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cautious", [False, True])
def test_adamw_wiring(ops, param_dtype, cautious):
    params, grads, m, v = _case(SIZES, param_dtype)
    steps = [1, 4, 2, 9, 3]
    counts = ops.adamw_mask_counts(grads, m, 0.9)
    expected_counts = reference.adamw_mask_counts(grads, m, 0.9)
    assert counts.dtype == torch.float32 and torch.equal(counts, expected_counts)
    scales = reference.mask_scales(counts, SIZES) if cautious else None
    ref = [_clone(params), _clone(m), _clone(v)]
    reference.adamw_apply(ref[0], grads, ref[1], ref[2], steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scales=scales)
    old = _clone(params)
    ops.adamw_apply(params, grads, m, v, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scales=scales)
    for i in range(len(SIZES)):
        _close(m[i], ref[1][i], m[i].abs() + grads[i].float().abs(), "exp_avg")
        _close(v[i], ref[2][i], v[i] + grads[i].float() ** 2, "exp_avg_sq")
        rounding = 0.0 if param_dtype == torch.float32 else 2.0**-7 / U  # one bf16 unit, in units of u
        _close(params[i], ref[0][i], old[i].float().abs() + (ref[0][i].float() - old[i].float()).abs(), "param", 8 + rounding)


@pytest.mark.parametrize("cautious", [False, True])
def test_lion_wiring(ops, cautious):
    params, grads, m, _ = _case(SIZES, seed=1)
    counts = ops.lion_mask_counts(grads, m, 0.9)
    assert torch.equal(counts, reference.lion_mask_counts(grads, m, 0.9))
    scales = reference.mask_scales(counts, SIZES) if cautious else None
    ref_p, ref_m = _clone(params), _clone(m)
    reference.lion_apply(ref_p, grads, ref_m, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
    old = _clone(params)
    ops.lion_apply(params, grads, m, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, scales=scales)
    for i in range(len(SIZES)):
        _close(m[i], ref_m[i], m[i].abs() + grads[i].abs(), "exp_avg")
        _close(params[i], ref_p[i], old[i].abs() + 1e-3 * 1e3, "param")  # |p| + lr * max scale


def _came_case(seed=2):
    gen = torch.Generator().manual_seed(seed)
    layouts = [FactoredLayout(shape, start, end) for shape, start, end in FACTORED]
    sizes = [l.end - l.start for l in layouts] + VECTOR
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) * 0.1 for n in sizes]
    exp_avgs = [torch.randn(n, generator=gen) * 0.05 for n in sizes]
    factors = [CameFactors(l, torch.rand(l.num_row_factors, generator=gen) + 0.5, torch.rand(l.num_col_factors, generator=gen) + 0.5) for l in layouts]
    factors += [CameFactors(elementwise=torch.rand(n, generator=gen) * 1e-2 + 1e-4) for n in VECTOR]
    return layouts, params, grads, exp_avgs, factors


def test_came_phases_wiring(ops):
    layouts, params, grads, exp_avgs, factors = _came_case()
    nf = len(layouts)
    # phase 1: factored sums and the 1-D second moment
    rows = [torch.zeros(l.num_row_factors) for l in layouts]
    cols = [torch.zeros(l.num_col_factors) for l in layouts]
    ref_rows, ref_cols = _clone(rows), _clone(cols)
    ops.came_factored_sq_sums(grads[:nf], layouts, 1e-30, rows, cols)
    reference.came_factored_sq_sums(grads[:nf], layouts, 1e-30, ref_rows, ref_cols)
    for l, a, b in zip(layouts, rows + cols, ref_rows + ref_cols):
        _close(a, b, b, "factored sums", 2 * max(l.rows, l.cols) + 8)
    vs = [f.elementwise.clone() for f in factors[nf:]]
    ref_vs = _clone(vs)
    ops.came_vector_second_moment(grads[nf:], vs, 0.999, 1e-30)
    reference.came_vector_second_moment(grads[nf:], ref_vs, 0.999, 1e-30)
    for a, b in zip(vs, ref_vs):
        _close(a, b, b, "exp_avg_sq")
    # phase 2: update sum of squares, mixing factored, elementwise and identity factors
    mixed = factors + [CameFactors()]
    mixed_grads = grads + [torch.randn(5)]
    _close(ops.came_update_sumsq(mixed_grads, mixed), reference.came_update_sumsq(mixed_grads, mixed), reference.came_update_sumsq(mixed_grads, mixed), "sumsq", 2 * 4099 + 8)
    # phase 3: momentum, residual sums, counts in the original slots
    divisors = torch.linspace(1.0, 2.0, len(grads))
    res_rows = [torch.zeros(l.num_row_factors) for l in layouts] + [None] * len(VECTOR)
    res_cols = [torch.zeros(l.num_col_factors) for l in layouts] + [None] * len(VECTOR)
    ref_res_rows = [None if t is None else t.clone() for t in res_rows]
    ref_res_cols = [None if t is None else t.clone() for t in res_cols]
    ref_m = _clone(exp_avgs)
    counts = ops.came_momentum(grads, exp_avgs, factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=res_rows, res_col_sums=res_cols)
    expected = reference.came_momentum(grads, ref_m, factors, divisors, beta1=0.9, eps2=1e-16, res_row_sums=ref_res_rows, res_col_sums=ref_res_cols)
    assert counts.dtype == torch.float32 and torch.equal(counts, expected)
    for a, b in zip(exp_avgs, ref_m):
        _close(a, b, b.abs() + 1, "exp_avg")
    for l, a, b in zip(layouts, res_rows[:nf] + res_cols[:nf], ref_res_rows[:nf] + ref_res_cols[:nf]):
        _close(a, b, b, "residual sums", 2 * max(l.rows, l.cols) + 64)
    # phase 4: the final update, factored confidence and 1-D identity, cautious scales by slot
    confidence = [f if f.layout is not None else CameFactors() for f in factors]
    scales = reference.mask_scales(expected, [p.numel() for p in params])
    ref_p = _clone(params)
    old = _clone(params)
    ops.came_apply(params, grads, exp_avgs, confidence, lr=1e-3, weight_decay=0.1, scales=scales)
    reference.came_apply(ref_p, grads, exp_avgs, confidence, lr=1e-3, weight_decay=0.1, scales=scales)
    for a, b, o in zip(params, ref_p, old):
        _close(a, b, o.abs() + (b - o).abs(), "param")


def test_came_factor_update_wiring(ops):
    """``came_factor_update``: the buffers and the runs reach the binding in its order, once per
    call; the emulator's torch ops then match the reference's, the means (float64 sums) within
    the sum bound of torch's fp32 mean. float64 buffers never reach the binding."""
    runs = [(2, 3, 4), (40, 5, 2), (1, 7, 3)]
    gen = torch.Generator().manual_seed(6)
    row_counts = torch.cat([torch.full((R * k,), float(C)) for R, C, k in runs])
    col_counts = torch.cat([torch.full((C * k,), float(R)) for R, C, k in runs])
    rows, cols = row_counts.numel(), col_counts.numel()
    native = reference.FactorBuffers(
        torch.rand(rows, generator=gen) + 0.1, torch.rand(cols, generator=gen) + 0.1, torch.rand(rows, generator=gen) * row_counts,
        torch.rand(cols, generator=gen) * col_counts, row_counts, col_counts, tuple((R, R * k) for R, _, k in runs),
        torch.empty(rows), torch.empty(cols), torch.empty(sum(k for *_, k in runs)),
    )  # fmt: skip
    expected = reference.FactorBuffers(*(v.clone() if isinstance(v, torch.Tensor) else v for v in vars(native).values()))
    ops.came_factor_update(native, 0.95)
    reference.came_factor_update(expected, 0.95)
    for key in ("row_state", "col_state", "col_factor"):
        assert torch.equal(getattr(native, key), getattr(expected, key)), key
    first = matrix = 0
    for R, _, k in runs:
        _close(native.means[matrix : matrix + k], expected.means[matrix : matrix + k], expected.means[matrix : matrix + k], f"means R={R}", R + 64)
        by_matrix = native.row_state[first : first + R * k].view(k, R)
        assert torch.equal(native.row_factor[first : first + R * k], (by_matrix / native.means[matrix : matrix + k].view(k, 1)).rsqrt().view(-1))
        first, matrix = first + R * k, matrix + k
    doubled = reference.FactorBuffers(*(v.double() if isinstance(v, torch.Tensor) else v for v in vars(native).values()))
    calls = []
    emulator = BindingEmulator()
    emulator.came_factor_update = lambda *a: calls.append(a)
    CudaOps(emulator, device_type="cpu").namespace().came_factor_update(doubled, 0.95)
    assert calls == []


def test_step_scalars_wiring(ops, monkeypatch):
    """``mask_scales`` / ``came_clip_divisors``: an fp32 sizes tensor reaches the binding, one call,
    in its argument order (the emulator's math is the reference's, the clip's square root and
    scalar division in the CUDA form); a list of sizes, float64 values or non-contiguous ones
    run the reference and never reach it."""
    gen = torch.Generator().manual_seed(7)
    sizes = torch.tensor([1.0, 7.0, 4099.0, 300.0])
    counts = torch.tensor([0.0, 7.0, 2000.0, 0.1])
    assert torch.equal(ops.mask_scales(counts, sizes), reference.mask_scales(counts, sizes))
    sumsq = torch.rand(4, generator=gen) * sizes * 4
    divisors = ops.came_clip_divisors(sumsq, sizes.sqrt(), 1.3)
    _close(divisors, reference.came_clip_divisors(sumsq, sizes.sqrt(), 1.3), divisors, "clip divisors", 4)
    calls = []
    monkeypatch.setattr(BindingEmulator, "mask_scales", lambda *a: calls.append(a))
    monkeypatch.setattr(BindingEmulator, "came_clip_divisors", lambda *a: calls.append(a))
    unbound = CudaOps(BindingEmulator(), device_type="cpu").namespace()
    assert torch.equal(unbound.mask_scales(counts, [1, 7, 4099, 300]), reference.mask_scales(counts, sizes))
    assert torch.equal(unbound.mask_scales(counts.double(), sizes.double()), reference.mask_scales(counts.double(), sizes.double()))
    assert torch.equal(unbound.mask_scales(torch.zeros(8)[::2], sizes), reference.mask_scales(torch.zeros(4), sizes))
    assert torch.equal(unbound.came_clip_divisors(sumsq.double(), sizes.double().sqrt(), 1.3), reference.came_clip_divisors(sumsq.double(), sizes.double().sqrt(), 1.3))
    assert calls == []


def test_came_factor_update_checks_buffers_not_their_elements(monkeypatch):
    """The buffers' check looks at each buffer, not at each of its elements: a strided buffer runs
    the reference instead of reaching the binding, and the check costs no Python per element (it
    once iterated every row and column of the segment, twice per step)."""
    calls = []
    monkeypatch.setattr(BindingEmulator, "came_factor_update", lambda *a: calls.append(a))
    wrapper = CudaOps(BindingEmulator(), device_type="cpu")
    iterated = []
    monkeypatch.setattr(torch.Tensor, "__iter__", lambda self: iterated.append(self.shape) or iter(self.unbind(0)))
    rows, cols = 6, 4
    strided = torch.ones(2 * rows)[::2]
    buffers = reference.FactorBuffers(
        strided, torch.ones(cols), torch.ones(rows), torch.ones(cols), torch.full((rows,), 4.0), torch.full((cols,), 3.0), ((3, rows),),
        torch.empty(rows), torch.empty(cols), torch.empty(2),
    )  # fmt: skip
    wrapper.came_factor_update(buffers, 0.9)
    assert calls == [] and iterated == []
    assert torch.equal(buffers.col_factor, torch.ones(cols).mul_(0.9).add_(torch.full((cols,), 1 / 3), alpha=0.1).rsqrt())


def test_unsupported_inputs_run_the_reference(ops, monkeypatch):
    """float64 and non-contiguous inputs never reach the binding."""
    calls = []
    monkeypatch.setattr(BindingEmulator, "lerp_mask_counts", lambda *a: calls.append(a))
    grads = [torch.randn(10, dtype=torch.float64)]
    exp_avgs = [torch.randn(20)[::2]]
    ops = CudaOps(BindingEmulator(), device_type="cpu").namespace()
    assert torch.equal(ops.lion_mask_counts(grads, exp_avgs, 0.9), reference.lion_mask_counts(grads, exp_avgs, 0.9))
    assert calls == []
    cuda_ops_for_cpu = CudaOps(BindingEmulator(), device_type="cuda").namespace()  # CPU tensors are not CUDA tensors
    cuda_ops_for_cpu.adamw_mask_counts([torch.randn(4)], [torch.randn(4)], 0.9)
    assert calls == []


def _train(name, monkeypatch, emulated: bool, steps: int = 4):
    import dist_cautious.optim as optim
    import dist_cautious.optim.base as base

    if emulated:
        namespace = CudaOps(BindingEmulator(), device_type="cpu").namespace()
        monkeypatch.setattr(base, "ops_for", lambda device: namespace)
    else:
        monkeypatch.setenv("DIST_CAUTIOUS_KERNELS", "reference")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 6, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 7))
    kwargs = {"CautiousAdamW": {}, "CautiousLion": {}, "CAME": {"lr": 2e-4, "cautious": True}}[name]
    optimizer = getattr(optim, name)(model.parameters(), **kwargs)
    data = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    monkeypatch.undo()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["CautiousAdamW", "CautiousLion", "CAME"])
def test_optimizers_through_the_wrapper(name, monkeypatch):
    emulated = _train(name, monkeypatch, emulated=True)
    expected = _train(name, monkeypatch, emulated=False)
    for a, b in zip(emulated, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # ALGORITHMS.md's bar after several steps


def test_calls_go_straight_to_the_extension_unless_a_mode_must_see_them():
    """No dispatch mode: the binding's own functions (the custom op's Python forwarder costs host
    time per tensor, kernels/routing.py). Inside a mode: ``torch.ops.dist_cautious``, the ops a
    mode sees and FakeTensorMode runs fake."""
    emulator = BindingEmulator()
    ops = CudaOps(emulator, device_type="cpu")
    assert ops._kernels() is emulator
    with StepRecorder():
        assert ops._kernels() is cuda_library.ops()
