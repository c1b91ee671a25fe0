"""Cautious weight decay (CWD, arXiv 2510.12402, Algorithm 1):

    x_{t+1} = x_t - lr * (u_t + wd * I(u_t * x_t >= 0) * x_t)        (entrywise)

``u_t`` is the update the optimizer subtracts (after the cautious update mask, when that is on).
Each optimizer is checked against its step written out here in float64 with plain tensor ops,
independently of the package, with CWD on and the update mask on and off. The tolerance is
float64 rounding of differently ordered ops (rtol 1e-12 over 6 steps); a CWD that decays every
coordinate, or none, is off by lr * wd * |x| ~ 1e-3 on the disagreeing coordinates."""

from __future__ import annotations

import math

import pytest
import torch

from dist_cautious import CAME, CautiousAdamW, CautiousLion

LR, WD, STEPS = 1e-2, 0.5, 6
SHAPES = [(6, 5), (2, 3, 4), (7,)]


def _params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64)) for shape in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def _mask_scaled(update: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    phi = agree.double()
    return update * phi / max(phi.mean().item(), 1e-3)


def _cwd_step(x: torch.Tensor, update: torch.Tensor) -> None:
    x.sub_(LR * (update + WD * (update * x >= 0).double() * x))


def adamw_formula(cautious: bool) -> list[torch.Tensor]:
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    xs = [p.detach().clone() for p in _params()]
    ms, vs = [torch.zeros_like(x) for x in xs], [torch.zeros_like(x) for x in xs]
    for t in range(1, STEPS + 1):
        for x, g, m, v in zip(xs, _grads(t), ms, vs):
            m.mul_(beta1).add_((1 - beta1) * g)
            v.mul_(beta2).add_((1 - beta2) * g * g)
            u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            if cautious:
                u = _mask_scaled(u, m * g > 0)
            _cwd_step(x, u)
    return xs


def lion_formula(cautious: bool) -> list[torch.Tensor]:
    beta1, beta2 = 0.9, 0.99
    xs = [p.detach().clone() for p in _params()]
    ms = [torch.zeros_like(x) for x in xs]
    for t in range(1, STEPS + 1):
        for x, g, m in zip(xs, _grads(t), ms):
            u = torch.sign(beta1 * m + (1 - beta1) * g)
            if cautious:
                u = _mask_scaled(u, u * g > 0)
            _cwd_step(x, u)
            m.mul_(beta2).add_((1 - beta2) * g)
    return xs


def came_formula(cautious: bool) -> list[torch.Tensor]:
    beta1, beta2, beta3, eps1, eps2 = 0.9, 0.999, 0.9999, 1e-30, 1e-16
    xs = [p.detach().clone() for p in _params()]
    states: list[dict[str, torch.Tensor]] = [{} for _ in xs]
    for t in range(1, STEPS + 1):
        for x, g, s in zip(xs, _grads(t), states):
            q = g * g + eps1
            if x.dim() >= 2:
                r = beta2 * s.get("r", torch.zeros(q.shape[:-1], dtype=q.dtype)) + (1 - beta2) * q.mean(dim=-1)
                c = beta2 * s.get("c", torch.zeros(q.shape[:-2] + q.shape[-1:], dtype=q.dtype)) + (1 - beta2) * q.mean(dim=-2)
                s["r"], s["c"] = r, c
                uh = g * (r / r.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * c.rsqrt().unsqueeze(-2)
            else:
                s["v"] = beta2 * s.get("v", torch.zeros_like(q)) + (1 - beta2) * q
                uh = g * s["v"].rsqrt()
            uh = uh / max(1.0, (uh.norm() / math.sqrt(uh.numel())).item())
            m = s["m"] = beta1 * s.get("m", torch.zeros_like(x)) + (1 - beta1) * uh
            if x.dim() >= 2:
                res = (uh - m) ** 2 + eps2
                big_r = beta3 * s.get("R", torch.zeros(q.shape[:-1], dtype=q.dtype)) + (1 - beta3) * res.mean(dim=-1)
                big_c = beta3 * s.get("C", torch.zeros(q.shape[:-2] + q.shape[-1:], dtype=q.dtype)) + (1 - beta3) * res.mean(dim=-2)
                s["R"], s["C"] = big_r, big_c
                u = m * (big_r / big_r.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * big_c.rsqrt().unsqueeze(-2)
            else:
                u = m
            if cautious:
                u = _mask_scaled(u, m * g > 0)
            _cwd_step(x, u)
    return xs


CASES = {
    "CautiousAdamW": (lambda params, **kw: CautiousAdamW(params, lr=LR, weight_decay=WD, **kw), adamw_formula),
    "CautiousLion": (lambda params, **kw: CautiousLion(params, lr=LR, weight_decay=WD, **kw), lion_formula),
    "CAME": (lambda params, **kw: CAME(params, lr=LR, weight_decay=WD, **kw), came_formula),
}


def _run(name: str, **options: bool) -> list[torch.Tensor]:
    params = _params()
    optimizer = CASES[name][0](params, **options)
    for t in range(1, STEPS + 1):
        for p, g in zip(params, _grads(t)):
            p.grad = g
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("cautious", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_cautious_weight_decay_matches_the_formula(name: str, cautious: bool) -> None:
    ours = _run(name, cautious=cautious, cautious_weight_decay=True)
    expected = CASES[name][1](cautious)
    for index, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name} param {SHAPES[index]}: {m}")
    plain = _run(name, cautious=cautious)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(ours, plain)), "CWD changed nothing: the test could not tell"


@pytest.mark.parametrize("name", CASES)
def test_cautious_weight_decay_without_decay_is_the_plain_step(name: str) -> None:
    """With weight_decay 0 the option changes nothing, bit for bit (and keeps the fused kernels)."""
    params, twins = _params(), _params()
    ours = CASES[name][0](params, cautious_weight_decay=True)
    plain = CASES[name][0](twins)
    for group in (*ours.param_groups, *plain.param_groups):
        group["weight_decay"] = 0.0
    for t in range(1, STEPS + 1):
        for p, q, g in zip(params, twins, _grads(t)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_cautious_weight_decay_in_fp32_math_follows_the_float64_formula(name: str, dtype: torch.dtype) -> None:
    """fp32 / bf16 params: fp32 math, so the result tracks the float64 formula to fp32 rounding
    compounded over 6 steps (rtol 1e-4), or to bf16 storage of the weights (one bf16 ulp per
    step, 2**-8 relative, for 6 steps: 3e-2)."""
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params()]
    optimizer = CASES[name][0](params, cautious=True, cautious_weight_decay=True)
    for t in range(1, STEPS + 1):
        for p, g in zip(params, _grads(t)):
            p.grad = g.to(dtype)
        optimizer.step()
    expected = CASES[name][1](True)
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(params, expected):
        torch.testing.assert_close(a.detach().double(), b, rtol=rtol, atol=rtol * 1e-2)
