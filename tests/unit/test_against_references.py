"""Single process: each optimizer against the package it must equal, step by step for 20 steps.

Shapes ``()``, ``(1,)``, ``(7,)``, ``(5, 3)``, ``(4, 3, 2, 2)`` and an empty tensor, fp32, with
weight decay on, over several param groups. Tolerance: the implementations order a few fp32
operations differently (lerp vs mul+add, sum/C vs mean), a few ulps (~1e-7 relative) per step;
over 20 steps that stays far below rtol 1e-5, atol 1e-6 (Lion's and the mask's sign decisions
flip only for entries within rounding of zero, which random data does not produce).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from came_pytorch import CAME as ReferenceCAME
from lion_pytorch import Lion as ReferenceLion

from dist_cautious import CAME, CautiousAdamW, CautiousLion
from tests.references import timm_optim

SHAPES = [(), (1,), (7,), (5, 3), (4, 3, 2, 2), (0,)]
STEPS = 20
RTOL, ATOL = 1e-5, 1e-6


def twin_params(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    torch.manual_seed(seed)
    values = [torch.randn(shape) for shape in SHAPES]
    return [torch.nn.Parameter(v.clone()) for v in values], [torch.nn.Parameter(v.clone()) for v in values]


def two_groups(params: list[torch.nn.Parameter], **second_group: float) -> list[dict]:
    """Two param groups, the second with its own hyperparameters."""
    return [{"params": params[:3]}, {"params": params[3:], **second_group}]


def step_both(ours: torch.optim.Optimizer, reference: torch.optim.Optimizer, a: list, b: list, steps: int = STEPS, seed: int = 1) -> None:
    """Feed identical gradients to both, compare every param after every step."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p, q in zip(a, b):
            grad = torch.randn(p.shape, generator=generator)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        for index, (p, q) in enumerate(zip(a, b)):
            torch.testing.assert_close(p.data, q.data, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step} param {SHAPES[index]}: {m}")


CASES: dict[str, tuple[Callable, Callable]] = {
    "adamw_vs_torch": (
        lambda groups: CautiousAdamW(groups, lr=1e-2, weight_decay=0.1, cautious=False),
        lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
    ),
    "cautious_adamw_vs_timm": (
        lambda groups: CautiousAdamW(groups, lr=1e-2, weight_decay=0.1),
        lambda groups: timm_optim("adamw").AdamWLegacy(groups, lr=1e-2, weight_decay=0.1, caution=True),
    ),
    "came_vs_came_pytorch": (
        lambda groups: CAME(groups, lr=2e-3, weight_decay=0.1),
        lambda groups: ReferenceCAME(groups, lr=2e-3, weight_decay=0.1),
    ),
    "lion_vs_lion_pytorch": (
        lambda groups: CautiousLion(groups, lr=1e-3, weight_decay=0.1, cautious=False),
        lambda groups: ReferenceLion(groups, lr=1e-3, weight_decay=0.1),
    ),
    "cautious_lion_vs_timm": (
        lambda groups: CautiousLion(groups, lr=1e-3, weight_decay=0.1),
        lambda groups: timm_optim("lion").Lion(groups, lr=1e-3, weight_decay=0.1, caution=True),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_over_groups(case: str) -> None:
    make_ours, make_reference = CASES[case]
    a, b = twin_params()
    second = {"lr": 3e-3, "weight_decay": 0.0}
    step_both(make_ours(two_groups(a, **second)), make_reference(two_groups(b, **second)), a, b)


def came_formula_step(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], lr: float, wd: float) -> None:
    """C-CAME written out from ALGORITHMS.md, whole tensors, independent of the package."""
    beta1, beta2, beta3 = 0.9, 0.999, 0.9999
    eps1, eps2, d = 1e-30, 1e-16, 1.0
    for p, g, s in zip(params, grads, states):
        if p.numel() == 0:
            continue
        q = g * g + eps1
        s.setdefault("m", torch.zeros_like(p))
        if p.dim() >= 2:
            for key, shape in (("r", q.shape[:-1]), ("c", q.shape[:-2] + q.shape[-1:]), ("R", q.shape[:-1]), ("C", q.shape[:-2] + q.shape[-1:])):
                s.setdefault(key, torch.zeros(shape))
            s["r"] = beta2 * s["r"] + (1 - beta2) * q.mean(dim=-1)
            s["c"] = beta2 * s["c"] + (1 - beta2) * q.mean(dim=-2)
            rf = (s["r"] / s["r"].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            uh = g * rf * s["c"].rsqrt().unsqueeze(-2)
        else:
            s["v"] = beta2 * s.get("v", torch.zeros_like(p)) + (1 - beta2) * q
            uh = g * s["v"].rsqrt()
        rms = uh.norm() / math.sqrt(uh.numel())
        uh = uh / max(1.0, rms.item() / d)
        s["m"] = beta1 * s["m"] + (1 - beta1) * uh
        if p.dim() >= 2:
            res = (uh - s["m"]) ** 2 + eps2
            s["R"] = beta3 * s["R"] + (1 - beta3) * res.mean(dim=-1)
            s["C"] = beta3 * s["C"] + (1 - beta3) * res.mean(dim=-2)
            u = s["m"] * (s["R"] / s["R"].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * s["C"].rsqrt().unsqueeze(-2)
        else:
            u = s["m"]
        phi = (u * g > 0).float()
        u = u * phi / max(phi.mean().item(), 1e-3)
        p.mul_(1 - lr * wd).sub_(lr * u)


def test_cautious_came_matches_formula() -> None:
    a, b = twin_params()
    ours = CAME(a, lr=2e-3, weight_decay=0.1, cautious=True)
    states: list[dict] = [{} for _ in b]
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        grads = [torch.randn(p.shape, generator=generator) for p in a]
        for p, g in zip(a, grads):
            p.grad = g.clone()
        ours.step()
        with torch.no_grad():
            came_formula_step([q.data for q in b], grads, states, lr=2e-3, wd=0.1)
        for p, q in zip(a, b):
            torch.testing.assert_close(p.data, q.data, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step}: {m}")


def test_cautious_mask_actually_changes_the_update() -> None:
    """Guards the tests above: with the mask on, results differ from the unmasked optimizer."""
    a, b = twin_params()
    step_kwargs = dict(lr=1e-2, weight_decay=0.0)
    ours, plain = CautiousAdamW(a, **step_kwargs), CautiousAdamW(b, cautious=False, **step_kwargs)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        ours.step()
        plain.step()
    assert not torch.allclose(a[4].data, b[4].data)
