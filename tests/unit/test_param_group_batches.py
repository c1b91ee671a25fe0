"""Param groups that differ only in ``lr`` / ``weight_decay`` share one kernel call per phase
(issue 12): a step over such groups must land on exactly the bits of separate optimizers, one
per group. Compared with ``torch.equal`` (the same per-element ops in the same order: any
difference is a wrong hyperparameter reaching a tensor, not rounding).

Run on the native CPU kernels in CI's main pass and on the torch reference ops in its reference
pass (``DIST_CAUTIOUS_KERNELS=reference``).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import dist_cautious.optim as optim
from dist_cautious.optim.base import batches

SHAPES = [(6, 5), (5,), (2, 3, 4), (7,), (4, 4), ()]

FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "CautiousAdamW": lambda groups: optim.CautiousAdamW(groups, lr=1e-3),
    "CautiousAdamW, cautious=False": lambda groups: optim.CautiousAdamW(groups, lr=1e-3, cautious=False),
    "CautiousAdamW, amsgrad, cautious decay": lambda groups: optim.CautiousAdamW(groups, lr=1e-3, amsgrad=True, cautious_weight_decay=True),
    "CautiousLion": lambda groups: optim.CautiousLion(groups, lr=1e-4),
    "CautiousLion, cautious=False": lambda groups: optim.CautiousLion(groups, lr=1e-4, cautious=False),
    "CAME, cautious=True": lambda groups: optim.CAME(groups, lr=2e-4, cautious=True),
    "CAME": lambda groups: optim.CAME(groups, lr=2e-4),
}

#: three groups: per group the positions of SHAPES it holds and what it sets; the first decays
#: nothing (so a batch that took the first group's decay for all would be caught)
GROUPS = [
    ([1, 3, 5], {"weight_decay": 0.0}),
    ([0, 2], {"lr": 3e-3, "weight_decay": 0.1}),
    ([4], {"lr": torch.tensor(7e-4), "weight_decay": 0.05}),
]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def _set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen).to(param.dtype)


def _run(
    name: str, dtype: torch.dtype, together: bool, between_steps: Callable[[list[Any], int], None]
) -> tuple[list[torch.nn.Parameter], list[torch.optim.Optimizer]]:
    """Three steps over GROUPS: in one optimizer (``together``) or one optimizer per group."""
    params = _params(dtype)
    groups = [{"params": [params[i] for i in positions], **options} for positions, options in GROUPS]
    optimizers = [FACTORIES[name](groups)] if together else [FACTORIES[name]([group]) for group in groups]
    for step in range(3):
        _set_grads(params, step)
        for optimizer in optimizers:
            optimizer.step()
        between_steps([group for optimizer in optimizers for group in optimizer.param_groups], step)
    return params, optimizers


def _state_tensors(optimizers: list[torch.optim.Optimizer], params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    state = {}
    for optimizer in optimizers:
        state.update(optimizer.state)
    return [value for param in params for _, value in sorted(state[param].items()) if isinstance(value, torch.Tensor)]


def _assert_same(name: str, dtype: torch.dtype, between_steps: Callable[[list[Any], int], None] = lambda groups, step: None) -> None:
    together, optimizers = _run(name, dtype, True, between_steps)
    apart, separate = _run(name, dtype, False, between_steps)
    for index, (a, b) in enumerate(zip(together, apart)):
        assert torch.equal(a, b), f"{name}: param {index} {SHAPES[index]} differs from its own optimizer's step"
    for a, b in zip(_state_tensors(optimizers, together), _state_tensors(separate, apart)):
        assert torch.equal(a, b), f"{name}: state differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_groups_in_one_call_step_as_separate_optimizers(name: str, dtype: torch.dtype) -> None:
    _assert_same(name, dtype)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_groups_share_a_batch_only_where_the_math_allows(name: str) -> None:
    """The three groups above share one batch; a group with other betas (or another flag)
    gets its own; a name or a scheduler's key in a group splits nothing."""
    params = _params(torch.float32)
    _set_grads(params, 0)
    optimizer = FACTORIES[name]([{"params": [p], **options} for p, (_, options) in zip(params, GROUPS)])
    optimizer.param_groups[0]["name"] = "decay"
    optimizer.param_groups[1]["initial_lr"] = 0.5
    work = optimizer._fresh_work()
    assert [len(batch.fragments) for batch in batches(work, optimizer.defaults)] == [3]
    betas = list(optimizer.param_groups[2]["betas"])
    betas[0] = 0.5
    optimizer.param_groups[2]["betas"] = tuple(betas)
    assert [len(batch.fragments) for batch in batches(work, optimizer.defaults)] == [2, 1]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_beta_changed_between_steps_reaches_its_group(name: str) -> None:
    """A momentum scheduler (``OneCycleLR(cycle_momentum=True)``) rewrites one group's betas
    between steps: the kept batches must follow (two batches from then on, same bits as
    separate optimizers)."""

    def schedule(groups: list[Any], step: int) -> None:
        betas = list(groups[1]["betas"])
        betas[0] = 0.8 - 0.1 * step
        groups[1]["betas"] = tuple(betas)

    _assert_same(name, torch.float32, schedule)
