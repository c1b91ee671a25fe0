"""Where PyTorch's own optimizer tests (test/test_optim.py, TestOptimRenewed) and checks beside
them found us differing from torch.optim: a Python-number ``step`` in a loaded state_dict, a
tensor lr of several elements (torch raises ValueError), 1-element tensor betas (torch accepts
them), resume of bf16 / fp16 / float64 params, copies (deepcopy, pickle, torch.save), and
AdamW's ``maximize`` / ``amsgrad`` / implementation switches."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from dist_cautious import CAME, CautiousAdamW, CautiousLion
from dist_cautious.optim.base import FragmentOptimizer, step_count

FACTORIES = {
    "CautiousAdamW": lambda params, **kw: CautiousAdamW(params, **kw),
    "CAME": lambda params, **kw: CAME(params, lr=kw.pop("lr", 1e-3), **kw),
    "CautiousLion": lambda params, **kw: CautiousLion(params, **kw),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_a_state_dict_with_number_steps_resumes_as_tensor_steps(name: str) -> None:
    """torch.optim accepts ``step`` as a Python number (older checkpoints): the resumed run must
    continue exactly as one whose steps were tensors."""
    torch.manual_seed(0)
    shapes = [(5, 3), (4,)]
    runs = []
    for as_number in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
        optimizer = FACTORIES[name](params)
        for step in range(2):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            optimizer.step()
        saved = optimizer.state_dict()
        if as_number:
            for state in saved["state"].values():
                state["step"] = float(state["step"])
        resumed = FACTORIES[name](params)
        resumed.load_state_dict(saved)
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i))
        resumed.step()
        runs.append([p.detach().clone() for p in params] + [float(resumed.state[params[0]]["step"])])
    assert runs[1][-1] == runs[0][-1] == 3.0
    for a, b in zip(runs[0][:-1], runs[1][:-1]):
        assert torch.equal(a, b)


def test_step_count_takes_a_number_step() -> None:
    """The path without a step plan (DeepSpeed's fragments) reads ``state["step"]`` itself."""
    state = {"step": 4.0}
    assert step_count(state) == 5 and isinstance(state["step"], torch.Tensor)
    assert step_count({}) == 1


@pytest.mark.parametrize("name", FACTORIES)
def test_a_tensor_lr_of_several_elements_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        FACTORIES[name]([torch.nn.Parameter(torch.randn(3))], lr=torch.tensor([1e-3, 1e-3]))


def test_one_element_tensor_betas_are_accepted_as_numbers() -> None:
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = CautiousAdamW([param], betas=betas)
    assert optimizer.param_groups[0]["betas"] == (pytest.approx(0.9), pytest.approx(0.99))
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        CautiousLion([param], betas=(torch.tensor(0.9), torch.tensor(1.5)))


# --- every param dtype: state dtype, resume, copies ---------------------------------------------

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = [(6, 5), (2, 3, 4), (7,), ()]
SETTINGS = [(name, cautious) for name in FACTORIES for cautious in (True, False)]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def _run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        _set_grads(params, step)
        optimizer.step()


def _expected_state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("name,cautious", SETTINGS)
def test_state_is_fp32_or_float64_as_torch_keeps_it(name: str, cautious: bool, dtype: torch.dtype) -> None:
    params = _params(dtype)
    optimizer = FACTORIES[name](params, cautious=cautious)
    _run(optimizer, params, range(2))
    for p in params:
        for key, value in optimizer.state[p].items():
            if key != "step":
                assert value.dtype == _expected_state_dtype(dtype), f"{key} of a {dtype} param is {value.dtype}"


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("name,cautious", SETTINGS)
def test_resume_after_load_state_dict_is_bit_identical(name: str, cautious: bool, dtype: torch.dtype) -> None:
    """torch casts loaded state to the param's dtype; ours keeps the dtype of its math, so a
    resumed run (through torch.save / torch.load, as trainers resume) continues bit for bit."""
    straight = _params(dtype)
    uninterrupted = FACTORIES[name](straight, cautious=cautious)
    _run(uninterrupted, straight, range(5))

    params = _params(dtype)
    first = FACTORIES[name](params, cautious=cautious)
    _run(first, params, range(2))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = FACTORIES[name](params, cautious=cautious)
    resumed.load_state_dict(torch.load(buffer))
    for p in params:
        assert all(v.dtype == _expected_state_dtype(dtype) for k, v in resumed.state[p].items() if k != "step")
    _run(resumed, params, range(2, 5))
    for a, b in zip(straight, params):
        assert torch.equal(a, b)
    assert float(resumed.state[params[0]]["step"]) == 5.0


def _copied_by(how: str, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """The params and optimizer as ``how`` reproduces them together (so the copy's param groups
    refer to the copied params, as a copied model + optimizer pair does)."""
    if how == "deepcopy":
        return copy.deepcopy((params, optimizer))
    if how == "pickle":
        return pickle.loads(pickle.dumps((params, optimizer)))
    buffer = io.BytesIO()
    torch.save((params, optimizer), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name,cautious", SETTINGS)
def test_a_copied_optimizer_steps_on_identically(name: str, cautious: bool, how: str) -> None:
    params = _params(torch.float32)
    optimizer = FACTORIES[name](params, cautious=cautious)
    _run(optimizer, params, range(2))
    copied_params, copied = _copied_by(how, params, optimizer)
    assert copied_params[0] is not params[0] and copied.param_groups[0]["params"][0] is copied_params[0]
    _run(optimizer, params, range(2, 4))
    _run(copied, copied_params, range(2, 4))
    for a, b in zip(params, copied_params):
        assert torch.equal(a, b)
    assert float(copied.state[copied_params[0]]["step"]) == 4.0


def test_a_copy_of_an_optimizer_a_backend_installed_into_refuses_to_step() -> None:
    """DeepSpeed sets ``fragment_source`` on the instance; a pickled copy loses it and would
    step flat partitions as whole tensors: it must refuse instead."""
    params = _params(torch.float32)
    optimizer = CautiousAdamW(params)
    optimizer.fragment_source = FragmentOptimizer.fragment_source  # what an installed backend leaves
    copied_params, copied = copy.deepcopy((params, optimizer))
    _set_grads(copied_params, 0)
    with pytest.raises(RuntimeError, match="fragment source"):
        copied.step()


# --- maximize, amsgrad, torch's implementation switches -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name,cautious", SETTINGS)
def test_maximize_is_the_step_on_the_negated_gradient(name: str, cautious: bool, dtype: torch.dtype) -> None:
    """torch.optim's definition; the gradient handed in is left as it was. (lr 1e-2: a step
    that moves bf16 weights of magnitude ~1, whose spacing is 2**-7.)"""
    flipped, negated = _params(dtype), _params(dtype)
    maximizing = FACTORIES[name](flipped, lr=1e-2, cautious=cautious, maximize=True)
    minimizing = FACTORIES[name](negated, lr=1e-2, cautious=cautious)
    for step in range(4):
        _set_grads(flipped, step)
        given = [p.grad.clone() for p in flipped]
        for p, q in zip(flipped, negated):
            q.grad = -p.grad
        maximizing.step()
        minimizing.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(flipped, given))
    for a, b in zip(flipped, negated):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(flipped, _params(dtype)))  # not a no-op on both sides


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("maximize", [False, True])
def test_amsgrad_and_maximize_match_torch_adamw(dtype: torch.dtype, maximize: bool) -> None:
    """Bit for bit against torch.optim.AdamW's for-loop implementation, with gradients that
    shrink so that the running maximum of v differs from v."""
    ours_params, torch_params = _params(dtype), _params(dtype)
    ours = CautiousAdamW(ours_params, lr=1e-2, weight_decay=0.1, cautious=False, amsgrad=True, maximize=maximize)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=maximize, foreach=False)
    for step in range(6):
        _set_grads(ours_params, step)
        for p, q in zip(ours_params, torch_params):
            p.grad.mul_(0.5**step)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        for p, q in zip(ours_params, torch_params):
            assert torch.equal(p, q), f"step {step}: {(p - q).abs().max()}"
    state = ours.state[ours_params[0]]
    assert not torch.equal(state["max_exp_avg_sq"], state["exp_avg_sq"])  # the maximum mattered


def test_cautious_amsgrad_masks_the_amsgrad_update() -> None:
    """C-AdamW with amsgrad, against the formula written out here: the AMSGrad step whose
    update ``m / (sqrt(max v / bc2) + eps)`` is masked where ``m * g <= 0`` and rescaled."""
    lr, wd, beta1, beta2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    params = _params(torch.float64)
    expected = [p.detach().clone() for p in params]
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p)) for p in expected]
    optimizer = CautiousAdamW(params, lr=lr, weight_decay=wd, amsgrad=True)
    for step in range(1, 6):
        _set_grads(params, step)
        for p, g, s in zip(expected, [q.grad for q in params], state):
            g = g * 0.5**step
            s["m"] = beta1 * s["m"] + (1 - beta1) * g
            s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
            s["vmax"] = torch.maximum(s["vmax"], s["v"])
            update = (s["m"] / (1 - beta1**step)) / ((s["vmax"] / (1 - beta2**step)).sqrt() + eps)
            phi = (s["m"] * g > 0).double()
            p.mul_(1 - lr * wd).sub_(lr * update * phi / max(phi.mean().item(), 1e-3))
        for q in params:
            q.grad.mul_(0.5**step)
        optimizer.step()
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)  # float64 rounding of differently ordered ops


@pytest.mark.parametrize(
    "option,value",
    [("foreach", False), ("fused", False), ("differentiable", True)],
)
def test_torch_implementation_switches_we_do_not_offer_are_refused(option: str, value: bool) -> None:
    with pytest.raises(ValueError, match=f"{option}={value}"):
        CautiousAdamW([torch.nn.Parameter(torch.randn(3))], **{option: value})


@pytest.mark.parametrize("option,value", [("foreach", None), ("foreach", True), ("fused", None), ("fused", True), ("differentiable", False), ("capturable", False), ("capturable", True)])
def test_torch_implementation_switches_asking_for_what_we_do_are_accepted(option: str, value: object) -> None:
    CautiousAdamW([torch.nn.Parameter(torch.randn(3))], **{option: value})


@pytest.mark.parametrize("name", FACTORIES)
def test_flags_must_be_booleans(name: str) -> None:
    with pytest.raises(TypeError, match="maximize"):
        FACTORIES[name]([torch.nn.Parameter(torch.randn(3))], maximize="yes")


@pytest.mark.parametrize("name,cautious", SETTINGS)
def test_a_group_mixing_float64_and_fp32_params_steps_each_as_alone(name: str, cautious: bool) -> None:
    """Each dtype's tensors are batched apart (fp32 math and float64 math): together in one
    group they step exactly as in two optimizers of their own."""
    mixed = _params(torch.float32)[:2] + _params(torch.float64)[2:]
    fp32_alone, float64_alone = _params(torch.float32)[:2], _params(torch.float64)[2:]
    together = FACTORIES[name](mixed, cautious=cautious)
    apart = [FACTORIES[name](fp32_alone, cautious=cautious), FACTORIES[name](float64_alone, cautious=cautious)]
    for step in range(3):
        _set_grads(mixed, step)
        for p, q in zip(mixed, fp32_alone + float64_alone):
            q.grad = p.grad.clone()
        together.step()
        for optimizer in apart:
            optimizer.step()
    for p, q in zip(mixed, fp32_alone + float64_alone):
        assert p.dtype == q.dtype and torch.equal(p, q)
    assert {v.dtype for p in mixed[2:] for k, v in together.state[p].items() if k != "step"} == {torch.float64}
