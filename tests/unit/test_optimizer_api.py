"""The torch.optim contract: dtypes, schedulers, closures, state dicts, skipped params, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dist_cautious import CAME, CautiousAdamW, CautiousLion

OPTIMIZERS = {
    "cautious_adamw": lambda params, **kw: CautiousAdamW(params, lr=1e-2, weight_decay=0.1, **kw),
    "adamw": lambda params, **kw: CautiousAdamW(params, lr=1e-2, weight_decay=0.1, cautious=False, **kw),
    "came": lambda params, **kw: CAME(params, lr=1e-2, weight_decay=0.1, **kw),
    "cautious_came": lambda params, **kw: CAME(params, lr=1e-2, weight_decay=0.1, cautious=True, **kw),
    "cautious_lion": lambda params, **kw: CautiousLion(params, lr=1e-3, weight_decay=0.1, **kw),
    "lion": lambda params, **kw: CautiousLion(params, lr=1e-3, weight_decay=0.1, cautious=False, **kw),
}
SHAPES = [(), (7,), (5, 3), (4, 3, 2, 2)]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in SHAPES]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each of ``values`` (fp32 tensor): 2**(exponent - mantissa bits),
    the subnormal spacing near zero."""
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(values.abs().clamp(min=info.smallest_normal))
    return torch.ldexp(torch.ones_like(values), exponent - 1 - mantissa_bits)


#: learning rates for the low-precision test: large enough that a step moves many entries of a
#: unit-sized bf16 weight by several ulps (a 1e-3 Lion step is below bf16's resolution at 1 and
#: could not be told from no step at all)
LOW_PRECISION_LR = 0.1


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_step_in_fp32(name: str, dtype: torch.dtype) -> None:
    """bf16/fp16 params: fp32 state and math on the upcast value, rounded back once per step.
    The twin keeps an fp32 copy, reloaded from the rounded low-precision value before each step,
    so both see the same inputs; each result must be the twin's rounded to ``dtype``, give or
    take one ulp of ``dtype`` where the fp32 results straddle a rounding boundary (they differ
    by a few fp32 ulps of math order). Every step moves some entry by more than 2 ulps, so a
    step that did nothing, or half the update, fails the one-ulp check."""
    low = make_params(dtype)
    high = [torch.nn.Parameter(p.detach().float()) for p in low]
    ours, twin = OPTIMIZERS[name](low), OPTIMIZERS[name](high)
    for optimizer in (ours, twin):
        for group in optimizer.param_groups:
            group["lr"] = LOW_PRECISION_LR
    for step in range(10):
        set_grads(low, step)
        before = [p.detach().float().clone() for p in low]
        for p, q in zip(low, high):
            q.data.copy_(p.data.float())
            q.grad = p.grad.float()
        ours.step()
        twin.step()
        moved = False
        for p, q, old in zip(low, high, before):
            assert p.dtype == dtype
            expected = q.data.to(dtype).float()
            spacing = ulp(expected, dtype)
            assert ((p.data.float() - expected).abs() <= spacing).all(), (step, (p.data.float() - expected).abs().max())
            moved |= bool(((expected - old).abs() > 2 * spacing).any())
        assert moved, f"step {step} moves no entry by more than 2 ulps: the check could not see it"
    for state in ours.state.values():
        for key, value in state.items():
            if key != "step":
                assert value.dtype == torch.float32, key


ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_resume_is_identical(name: str, dtype: torch.dtype) -> None:
    straight = make_params(dtype)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    opt_straight = OPTIMIZERS[name](straight)
    opt_first = OPTIMIZERS[name](resumed)
    for step in range(4):
        set_grads(straight, step)
        set_grads(resumed, step)
        opt_straight.step()
        opt_first.step()
    saved = copy.deepcopy(opt_first.state_dict())
    opt_second = OPTIMIZERS[name](resumed)
    opt_second.load_state_dict(saved)
    for step in range(4, 8):
        set_grads(straight, step)
        set_grads(resumed, step)
        opt_straight.step()
        opt_second.step()
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_scheduler_lr_is_read_every_step(name: str, dtype: torch.dtype) -> None:
    """A scheduler that sets lr to 0 on the second step stops all motion but weight decay's (0 too)."""
    params = make_params(dtype)
    optimizer = OPTIMIZERS[name](params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step == 0 else 0.0)
    set_grads(params, 0)
    optimizer.step()
    scheduler.step()
    before = [p.detach().clone() for p in params]
    set_grads(params, 1)
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 0.0
    for p, q in zip(params, before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure_zero_grad_and_params_without_grad(name: str, dtype: torch.dtype) -> None:
    params = make_params(dtype)
    untouched = params[1].detach().clone()
    optimizer = OPTIMIZERS[name](params)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = sum((p.float() ** 2).sum() for i, p in enumerate(params) if i != 1)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert params[1].grad is None
    assert torch.equal(params[1].data, untouched)
    assert params[1] not in optimizer.state
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


def test_state_keys_and_defaults() -> None:
    matrix, vector = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    for p in (matrix, vector):
        p.grad = torch.randn(p.shape)
    adamw, came, lion = CautiousAdamW([matrix, vector]), CAME([matrix, vector], lr=2e-4), CautiousLion([matrix, vector])
    for optimizer in (adamw, came, lion):
        optimizer.step()
    assert set(adamw.state[matrix]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(lion.state[matrix]) == {"step", "exp_avg"}
    assert set(came.state[matrix]) == {"step", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col"}
    assert came.state[matrix]["exp_avg_sq_row"].shape == (4,) and came.state[matrix]["exp_avg_sq_col"].shape == (3,)
    assert set(came.state[vector]) == {"step", "exp_avg", "exp_avg_sq"}
    assert adamw.defaults == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, cautious=True, cautious_weight_decay=False, amsgrad=False, maximize=False, capturable=False)
    assert lion.defaults == dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, cautious=True, cautious_weight_decay=False, maximize=False, capturable=False)
    assert came.defaults == dict(
        lr=2e-4, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999), weight_decay=0.0, cautious=False, cautious_weight_decay=False, maximize=False,
        capturable=False,
    )
    assert all(float(adamw.state[p]["step"]) == 1.0 for p in (matrix, vector))


def test_betas_from_json_lists_are_accepted() -> None:
    optimizer = CAME([torch.nn.Parameter(torch.randn(2, 2))], lr=1e-3, betas=[0.9, 0.99, 0.999], eps=[1e-30, 1e-16])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99, 0.999)
    assert optimizer.param_groups[0]["eps"] == (1e-30, 1e-16)


def test_channels_last_conv_weight_steps_in_logical_order() -> None:
    """CAME factors the logical last two dims; a channels_last weight must step like a contiguous one."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 2, 2)
    dense = torch.nn.Parameter(weight.clone())
    strided = torch.nn.Parameter(weight.clone().to(memory_format=torch.channels_last))
    grad = torch.randn(4, 3, 2, 2)
    dense.grad, strided.grad = grad.clone(), grad.clone().to(memory_format=torch.channels_last)
    CAME([dense], lr=1e-2, cautious=True).step()
    CAME([strided], lr=1e-2, cautious=True).step()
    assert strided.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(strided.data, dense.data, rtol=0, atol=0)


BAD_ARGUMENTS = [
    (CautiousAdamW, dict(lr=-1e-3), ValueError, "lr"),
    (CautiousAdamW, dict(lr=float("nan")), ValueError, "lr"),
    (CautiousAdamW, dict(lr=float("inf")), ValueError, "lr"),
    (CautiousAdamW, dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (CautiousAdamW, dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (CautiousAdamW, dict(betas=(0.9,)), ValueError, "betas"),
    (CautiousAdamW, dict(eps=-1e-8), ValueError, "eps"),
    (CautiousAdamW, dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (CautiousLion, dict(lr=-1.0), ValueError, "lr"),
    (CautiousLion, dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\]"),
    (CautiousLion, dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    (CAME, dict(), ValueError, "lr is required"),
    (CAME, dict(lr=1e-3, betas=(0.9, 0.999)), ValueError, "betas"),
    (CAME, dict(lr=1e-3, eps=(1e-30, -1.0)), ValueError, r"eps\[1\]"),
    (CAME, dict(lr=1e-3, clip_threshold=0.0), ValueError, "clip_threshold"),
    (CAME, dict(lr=1e-3, weight_decay=-1.0), ValueError, "weight_decay"),
]


@pytest.mark.parametrize("cls,kwargs,error,match", BAD_ARGUMENTS)
def test_bad_hyperparameters_name_the_argument(cls: type, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cls([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_bad_group_hyperparameter_is_caught() -> None:
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="lr"):
        CautiousAdamW([{"params": params, "lr": -1.0}])


@pytest.mark.parametrize("cls", [CautiousAdamW, CautiousLion, lambda p: CAME(p, lr=1e-3)])
def test_complex_and_integer_params_are_refused(cls) -> None:
    with pytest.raises(TypeError, match="complex"):
        cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating point"):
        cls([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_that_raises_changes_nothing(name: str) -> None:
    """One sparse gradient among dense ones: the step raises before touching any param or state."""
    params = make_params()
    sparse = torch.nn.Parameter(torch.randn(6))
    optimizer = OPTIMIZERS[name](params + [sparse])
    set_grads(params, 0)
    optimizer.step()
    snapshot = copy.deepcopy(optimizer.state_dict())
    values = [p.detach().clone() for p in params]
    set_grads(params, 1)
    sparse.grad = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.tensor([1.0, 2.0]), (6,))
    with pytest.raises(ValueError, match="sparse"):
        optimizer.step()
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    after = optimizer.state_dict()["state"]
    for key, state in snapshot["state"].items():
        for name_, value in state.items():
            assert torch.equal(torch.as_tensor(after[key][name_]), torch.as_tensor(value)), name_
    optimizer.param_groups[0]["lr"] = -1.0
    sparse.grad = None
    with pytest.raises(ValueError, match="lr"):
        optimizer.step()
    for p, v in zip(params, values):
        assert torch.equal(p, v)


def test_all_zero_gradient_stays_finite() -> None:
    """A tensor whose gradient is zero everywhere: CAME's eps1 keeps the factors finite."""
    matrix = torch.nn.Parameter(torch.randn(3, 4))
    matrix.grad = torch.zeros(3, 4)
    optimizer = CAME([matrix], lr=1e-2, cautious=True)
    optimizer.step()
    assert torch.isfinite(matrix).all()
    assert math.isfinite(float(optimizer.state[matrix]["exp_avg_sq_row"].sum()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_step_runs_eagerly_with_the_same_result(name: str) -> None:
    """``torch.compile(optimizer.step)``, as torch's compiled-optimizer recipe does: the step is
    not traced (a graph break) and lands on the eager step's bits. Traced, it failed inside dynamo
    on the step plan's counters (InternalTorchDynamoError)."""
    finals = []
    for compiled in (False, True):
        params = make_params()
        optimizer = OPTIMIZERS[name](params)
        torch._dynamo.reset()
        step = torch.compile(optimizer.step) if compiled else optimizer.step
        for index in range(3):
            set_grads(params, index)
            step()
        finals.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    assert not torch.equal(finals[0][2], make_params()[2])  # the steps did move the params
