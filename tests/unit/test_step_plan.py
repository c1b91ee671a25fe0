"""The step plan rebinds new gradient tensors without changing a result (issue 12).

A training loop hands the optimizer new grad tensors every step (``zero_grad(set_to_none=True)``,
torch's default); the plan binds them to its kept fragments instead of rebuilding them, after
checking that each still fits what it checked at build. These tests compare, bit for bit, a run
whose grads are new tensors every step with one whose grads are the same tensors refilled in
place, and show that a new grad the plan cannot bind as a view (not contiguous) is still stepped
right (the plan is rebuilt, the step runs on fresh fragments).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch

import dist_cautious.optim as optim
from dist_cautious.optim.plan import PartitionStepPlan
from dist_cautious.shard.zero import Piece, ZeroFragmentSource

SHAPES = [(6, 5), (7,), (), (3, 4, 2), (1,), (5, 3)]
STEPS = 5
FACTORIES: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "CautiousAdamW": lambda ps: optim.CautiousAdamW(ps, lr=1e-2, weight_decay=0.1),
    "CautiousLion": lambda ps: optim.CautiousLion(ps, lr=1e-3, weight_decay=0.1),
    "CAME, cautious=True": lambda ps: optim.CAME(ps, lr=1e-2, weight_decay=0.1, cautious=True),
}


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _run(name: str, hand_over: Callable[[list[torch.nn.Parameter], list[torch.Tensor], int], None]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]
    optimizer = FACTORIES[name](params)
    for step in range(STEPS):
        hand_over(params, _grads(step), step)
        optimizer.step()
    return [p.detach().clone() for p in params] + [v for p in params for _, v in sorted(optimizer.state[p].items())]


def _refilled(params: list[torch.nn.Parameter], grads: list[torch.Tensor], step: int) -> None:
    for param, grad in zip(params, grads):
        if param.grad is None:
            param.grad = grad.clone()
        else:
            param.grad.copy_(grad)


def _new_tensors(params: list[torch.nn.Parameter], grads: list[torch.Tensor], step: int) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad


def _a_strided_one_at_step_2(params: list[torch.nn.Parameter], grads: list[torch.Tensor], step: int) -> None:
    for param, grad in zip(params, grads):
        # step 2: the first matrix's grad is a transposed copy (same values, not contiguous)
        param.grad = grad.t().contiguous().t() if step == 2 and grad.shape == (6, 5) else grad


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("hand_over", [_new_tensors, _a_strided_one_at_step_2], ids=["new-tensors", "strided-at-step-2"])
def test_rebound_grads_step_as_refilled_ones(name: str, hand_over: Callable[..., None]) -> None:
    expected, got = _run(name, _refilled), _run(name, hand_over)
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"{name}: entry {index} differs"


def test_host_overhead_benchmark_prints_every_contender(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark of issue 12 runs (one round, single process, new grads every step) and
    prints a row with a ratio for every contender; a contender that cannot run is a skipped
    row with its reason, never a missing one."""
    from dist_cautious.bench import host_overhead

    host_overhead.main(["--rounds", "1", "--no-fsdp", "--no-zero", "--no-deepspeed", "--grads", "new"])
    out = capsys.readouterr().out
    assert "new grad tensors every step" in out
    for name, _, _ in host_overhead.contenders(with_deepspeed=False):
        assert any(line.startswith(f"| {name} | ") and line.rstrip().endswith("|") and "x |" in line for line in out.splitlines()), name


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_dropped_grad_is_freed_after_the_step(name: str) -> None:
    """The plan keeps no gradient between steps: a grad the user drops after ``step()``
    (``zero_grad(set_to_none=True)``) is freed then, as with torch.optim, not kept alive through
    the next forward and backward by the plan's fragments."""
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = FACTORIES[name](params)
    for step in range(3):
        _new_tensors(params, _grads(step), step)
        refs = [weakref.ref(p.grad) for p in params]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        assert all(ref() is None for ref in refs), f"step {step}: a dropped grad is still referenced"


def _partition_source(flat: torch.nn.Parameter, members: list[torch.Tensor]) -> ZeroFragmentSource:
    """A DeepSpeed-like flat partition holding ``members`` whole, back to back (one process:
    no process group), behind the fragment source DeepSpeed's integration installs."""
    pieces, offset = [], 0
    for index, member in enumerate(members):
        pieces.append(Piece(index, f"member{index}", member, member.shape, offset, 0, member.numel(), None))
        offset += member.numel()
    return ZeroFragmentSource(lambda: {id(flat): (flat, pieces)}, ("exp_avg",))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_partition_plan_steps_as_whole_tensors_and_lets_go_of_the_flat_grad(name: str) -> None:
    """The ZeRO plan (``PartitionStepPlan``) without DeepSpeed: one flat partition holding
    whole tensors, a new flat gradient every step (as ZeRO-1/2 hand over), steps bit for bit
    as the same tensors stepped apart; after each step the flat gradient is not referenced."""
    gen = torch.Generator().manual_seed(0)
    members = [torch.randn(shape, generator=gen) for shape in SHAPES]
    flat = torch.nn.Parameter(torch.cat([m.reshape(-1) for m in members]))
    apart = [torch.nn.Parameter(m.clone()) for m in members]
    partitioned, plain = FACTORIES[name]([flat]), FACTORIES[name](apart)
    partitioned.fragment_source = _partition_source(flat, members)
    for step in range(STEPS):
        grads = _grads(step)
        flat.grad = torch.cat([g.reshape(-1) for g in grads])
        _new_tensors(apart, grads, step)
        ref = weakref.ref(flat.grad)
        partitioned.step()
        plain.step()
        flat.grad = None
        gc.collect()
        assert ref() is None, f"step {step}: the flat gradient is still referenced"
    assert isinstance(partitioned._plan_in_use, PartitionStepPlan)
    assert torch.equal(flat.detach(), torch.cat([p.detach().reshape(-1) for p in apart]))
