"""Faults that tools/mutation_check.py planted and the rest of the suite let through.

Random normal gradients and the default eps hide three kinds of wrong math:
- the mask test ``u * g >= 0`` instead of ``> 0``: the two differ only where a product is
  exactly zero, which random data never produces; here a third of the gradient entries are
  exactly zero (as ReLU networks and unused embedding rows give);
- eps placed before the bias correction of ``sqrt(v)``: with eps 1e-8 and unit gradients the
  difference is ~1e-7 relative, under any sensible tolerance; here eps is 1e-2;
- the floor of the mask mean (1e-3) moved: it only binds when fewer than 1% of a tensor's
  entries agree in sign; here 5 of 1000 do on the second step.

Each case compares a whole step sequence with the package the optimizer must equal (timm's
``caution=True`` optimizers, torch's AdamW, and for C-CAME the formula of ALGORITHMS.md written
out in tests/unit/test_against_references.py), at that file's tolerance (rtol 1e-5, atol 1e-6:
a few fp32 ulps per step of differently ordered math). Each fault moves some weight by orders of
magnitude more: a whole AdamW step (~lr = 1e-2) at a zero-gradient entry, a 2x larger denominator,
a 2x smaller mask scale.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dist_cautious import CAME, CautiousAdamW, CautiousLion
from tests.references import timm_optim
from tests.unit.test_against_references import came_formula_step

RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(7,), (5, 3), (4, 3, 2, 2)]


def _compare(ours: torch.optim.Optimizer, step_reference: Callable[[list[torch.Tensor]], None], a: list, b: list, grads_per_step: list[list[torch.Tensor]]) -> None:
    for step, grads in enumerate(grads_per_step):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        step_reference(grads)
        for p, q in zip(a, b):
            torch.testing.assert_close(p.data, q.data, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step} shape {tuple(p.shape)}: {m}")


def _twins(shapes: list[tuple[int, ...]], seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    torch.manual_seed(seed)
    values = [torch.randn(shape) for shape in shapes]
    return [torch.nn.Parameter(v.clone()) for v in values], [torch.nn.Parameter(v.clone()) for v in values]


def _reference_stepper(name: str, params: list[torch.nn.Parameter], **kwargs: float) -> Callable[[list[torch.Tensor]], None]:
    """A function that steps the reference of ``name`` on ``params`` with the given grads."""
    if name == "came":
        states: list[dict] = [{} for _ in params]

        def came_step(grads: list[torch.Tensor]) -> None:
            with torch.no_grad():
                came_formula_step([p.data for p in params], grads, states, lr=kwargs["lr"], wd=kwargs["weight_decay"])

        return came_step
    if name == "adamw":
        optimizer = timm_optim("adamw").AdamWLegacy(params, caution=True, **kwargs)
    elif name == "adamw_plain":
        optimizer = torch.optim.AdamW(params, **kwargs)
    else:
        optimizer = timm_optim("lion").Lion(params, caution=True, **kwargs)
    return lambda grads: optimizer.step()


def _ours(name: str, params: list[torch.nn.Parameter], **kwargs: float) -> torch.optim.Optimizer:
    if name == "came":
        return CAME(params, cautious=True, **kwargs)
    if name == "adamw":
        return CautiousAdamW(params, **kwargs)
    if name == "adamw_plain":
        return CautiousAdamW(params, cautious=False, **kwargs)
    return CautiousLion(params, **kwargs)


HYPER = {"adamw": dict(lr=1e-2, weight_decay=0.1), "lion": dict(lr=1e-3, weight_decay=0.1), "came": dict(lr=2e-3, weight_decay=0.1)}


@pytest.mark.parametrize("name", ["adamw", "lion", "came"])
def test_mask_is_strict_where_the_gradient_is_exactly_zero(name: str) -> None:
    """phi = 1[u * g > 0]: an entry whose gradient is exactly 0 is masked, and not counted."""
    a, b = _twins(SHAPES)
    generator = torch.Generator().manual_seed(1)
    grads_per_step = []
    for _ in range(6):
        grads = []
        for shape in SHAPES:
            g = torch.randn(shape, generator=generator)
            g[torch.rand(shape, generator=generator) < 1 / 3] = 0.0
            grads.append(g)
        grads_per_step.append(grads)
    assert all((g == 0).any() for grads in grads_per_step[1:] for g in grads), "no exact zeros: the test would see nothing"
    _compare(_ours(name, a, **HYPER[name]), _reference_stepper(name, b, **HYPER[name]), a, b, grads_per_step)


@pytest.mark.parametrize("name", ["adamw", "adamw_plain"])
def test_adamw_eps_is_added_after_the_bias_correction(name: str) -> None:
    """torch-style eps: ``m_hat / (sqrt(v) / sqrt(1 - b2^t) + eps)``. eps 1e-2 against unit
    gradients, where sqrt(1 - b2^t) ~ 0.03-0.1 over these steps: eps placed before the
    correction would weigh 10-30x more."""
    a, b = _twins(SHAPES)
    generator = torch.Generator().manual_seed(2)
    grads_per_step = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(5)]
    hyper = dict(lr=1e-2, weight_decay=0.1, eps=1e-2)
    _compare(_ours(name, a, **hyper), _reference_stepper(name, b, **hyper), a, b, grads_per_step)


def _few_agreeing_grads(numel: int = 1000, agreeing: int = 5) -> list[list[torch.Tensor]]:
    """Two steps on one 1-D tensor: a unit gradient, then a 100x smaller one of the opposite
    sign everywhere but at ``agreeing`` entries. After step 2, ``lerp(m, g, 0.1)`` keeps step 1's
    sign (0.9 * 0.1 > 0.1 * 0.01): AdamW's and Lion's updates, and CAME's momentum, agree with
    the gradient at those entries only."""
    generator = torch.Generator().manual_seed(3)
    first = torch.rand(numel, generator=generator) + 0.5
    second = -0.01 * first
    second[:agreeing] *= -1
    return [[first], [second]]


@pytest.mark.parametrize("name", ["adamw", "lion", "came"])
def test_mask_mean_floor_is_one_in_a_thousand(name: str) -> None:
    """scale = 1 / max(mean(phi), 1e-3): with 5 of 1000 entries agreeing the scale is 200 (a
    floor of 1e-2 would make it 100)."""
    grads_per_step = _few_agreeing_grads()
    m = torch.zeros(1000)
    for (g,) in grads_per_step:
        u = torch.lerp(m, g, 0.1)
        m = u
    mean = (u * grads_per_step[-1][0] > 0).float().mean().item()
    assert 1e-3 < mean < 1e-2, f"the case does not put the mask mean between the floors ({mean})"
    a, b = _twins([(1000,)])
    _compare(_ours(name, a, **HYPER[name]), _reference_stepper(name, b, **HYPER[name]), a, b, grads_per_step)
