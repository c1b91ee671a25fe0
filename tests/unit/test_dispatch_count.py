"""The ops one step dispatches do not grow with the number of tensors (issue 12).

After the first step (which builds the step plan and the state), a step of CautiousAdamW,
CautiousLion or CAME on the native CPU kernels dispatches the same torch ops for 10 tensors as
for 100: the per-tensor work is inside the kernels, and CAME's factor math is one native call
per reduction over flat buffers holding all tensors' factors. New grad tensors every step (``zero_grad(set_to_none=True)``,
what a training loop hands over) add no op: the plan binds each local grad as it is.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dist_cautious.optim as optim
from dist_cautious.kernels import ops_for
from tests.op_counter import CountOps


def _params(count: int) -> list[torch.nn.Parameter]:
    """Alternating 8x8 matrices and 8-vectors with gradients."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for index in range(count):
        shape = (8, 8) if index % 2 == 0 else (8,)
        param = torch.nn.Parameter(torch.randn(shape, generator=gen))
        param.grad = torch.randn(shape, generator=gen)
        params.append(param)
    return params


def _second_step(factory: Any, count: int, new_grads: bool) -> CountOps:
    """The ops dispatched by the second step of ``factory(params)`` on ``count`` tensors."""
    params = _params(count)
    optimizer = factory(params)
    optimizer.step()
    if new_grads:  # zero_grad(set_to_none=True) then backward: new grad tensors, rebound by the plan
        for param in params:
            param.grad = param.grad.clone()
    with CountOps() as counter:
        optimizer.step()
    return counter


def _ops_in_second_step(factory: Any, count: int, new_grads: bool) -> int:
    return _second_step(factory, count, new_grads).count


FACTORIES = {
    "CautiousAdamW": lambda ps: optim.CautiousAdamW(ps, lr=1e-3),
    "CautiousAdamW, cautious=False": lambda ps: optim.CautiousAdamW(ps, lr=1e-3, cautious=False),
    "CautiousLion": lambda ps: optim.CautiousLion(ps, lr=1e-4),
    "CautiousLion, cautious=False": lambda ps: optim.CautiousLion(ps, lr=1e-4, cautious=False),
    "CAME, cautious=True": lambda ps: optim.CAME(ps, lr=2e-4, cautious=True),
    "CAME": lambda ps: optim.CAME(ps, lr=2e-4),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_same_dispatch_count_for_10_and_100_tensors(name: str) -> None:
    if not hasattr(ops_for(torch.device("cpu")), "trusted"):
        pytest.skip("native CPU kernels unavailable: the torch reference path issues ops per tensor by design")
    few = _ops_in_second_step(FACTORIES[name], 10, new_grads=False)
    many = _ops_in_second_step(FACTORIES[name], 100, new_grads=False)
    assert few == many, f"{name}: {few} ops for 10 tensors, {many} for 100"
    assert few > 0  # the counter sees the step's own ops (step advance, mask scales, CAME's factor math)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_new_grad_tensors_cost_no_op(name: str) -> None:
    """100 tensors, 50 of them 8x8: a step on new grad tensors dispatches exactly the ops of a
    step on the same ones. The native kernels read each local grad as flat, so binding a grad
    is no op; the plan before viewed every grad (+100 ops), and without a plan every fragment
    was rebuilt (several ops per tensor)."""
    if not hasattr(ops_for(torch.device("cpu")), "trusted"):
        pytest.skip("native CPU kernels unavailable: the torch reference path issues ops per tensor by design")
    same = _ops_in_second_step(FACTORIES[name], 100, new_grads=False)
    new = _ops_in_second_step(FACTORIES[name], 100, new_grads=True)
    assert new == same, f"{name}: {same} ops with the same grads, {new} with new ones"


_CAME_KERNELS = ["came_factored_sq_sums", "came_vector_second_moment", "came_update_sumsq", "came_momentum", "came_apply"]
#: the native kernels one step runs: each a custom op, called once for all tensors of the group
#: (a cautious step's mask scales once; CAME's factor math twice: after each reduction of row /
#: column sums)
KERNELS = {
    "CautiousAdamW": ["adamw_mask_counts", "mask_scales", "adamw_apply"],
    "CautiousAdamW, cautious=False": ["adamw_apply"],
    "CautiousLion": ["lion_encode", "mask_scales", "lion_decode_apply"],
    "CautiousLion, cautious=False": ["lion_apply"],
    "CAME, cautious=True": [*_CAME_KERNELS, "mask_scales"],
    "CAME": _CAME_KERNELS,
}


def _once_each(name: str) -> dict[str, int]:
    """What the counter must see of the native kernels in one step of ``name``."""
    calls = {f"dist_cautious_cpu::{op}": 1 for op in KERNELS[name]}
    if name.startswith("CAME"):
        calls["dist_cautious_cpu::came_factor_update"] = 2
    return calls


@pytest.mark.parametrize("name", list(FACTORIES))
def test_native_kernels_are_counted_as_one_custom_op_each(name: str) -> None:
    """The CPU kernels go through the dispatcher as ``dist_cautious_cpu`` custom ops while a
    dispatch mode is active: the counter sees each kernel once per step, whatever the number of
    tensors (a kernel called per tensor, or not seen at all, fails this)."""
    if not hasattr(ops_for(torch.device("cpu")), "trusted"):
        pytest.skip("native CPU kernels unavailable")
    for count in (10, 100):
        counter = _second_step(FACTORIES[name], count, new_grads=True)
        native = {op: n for op, n in counter.by_name.items() if op.startswith("dist_cautious_cpu::")}
        assert native == _once_each(name), f"{name}, {count} tensors: {native}"


def _decay_split(factory: Any) -> Any:
    """``factory`` over two param groups that differ in lr and weight_decay (matrices decayed,
    vectors not: the split Hugging Face's Trainer and timm make)."""
    return lambda ps: factory([{"params": ps[0::2], "weight_decay": 0.1, "lr": 3e-4}, {"params": ps[1::2], "weight_decay": 0.0}])


@pytest.mark.parametrize("name", list(FACTORIES))
def test_param_groups_differing_in_lr_and_decay_share_each_call(name: str) -> None:
    """A decay / no-decay split costs no op and no kernel call over one group: each native
    kernel runs once per step for both groups (lr and weight_decay travel per tensor), and the
    step dispatches exactly the ops of the one-group step. One call per group fails this."""
    if not hasattr(ops_for(torch.device("cpu")), "trusted"):
        pytest.skip("native CPU kernels unavailable")
    for count in (10, 100):
        one_group = _second_step(FACTORIES[name], count, new_grads=True)
        split = _second_step(_decay_split(FACTORIES[name]), count, new_grads=True)
        native = {op: n for op, n in split.by_name.items() if op.startswith("dist_cautious_cpu::")}
        assert native == _once_each(name), f"{name}, {count} tensors: {native}"
        assert split.count == one_group.count, f"{name}, {count} tensors: {split.count} ops with two groups, {one_group.count} with one"
