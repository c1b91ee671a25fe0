"""CAME's factor math, batched over all fragments in flat buffers (the torch reference ops of
``came_factor_update``), is bit for bit the per-tensor statement (``_ema_`` then
``_normalised_rsqrt``) it replaces. The native kernel's version is checked against these ops in
tests/kernels/test_cpu_kernels.py.

Why the batched ops give the per-tensor bits: the EMA, the division by the means and the rsqrt
are elementwise, and torch rounds each element the same whether it sits in a vector lane or in a
loop's scalar tail (``add(alpha=)`` rounds once in both; checked here on sizes that leave tails
everywhere). The per-matrix means are a reduction: over a contiguous ``(N, R)`` view each row is
summed on its own, exactly as ``(B, R).mean(dim=-1)`` of its own tensor sums it, as long as one
output is never split over threads; torch may split from ``R`` = 32768 (its grain size) on, so
runs of such matrices take their means one tensor at a time. The check runs with two threads
and includes matrices of 40000 and 33000 rows.

The partial sums are views into one packed buffer per phase and process group, reduced in
place; the last test runs the reducer on two gloo ranks for that and for its index path.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from dist_cautious.kernels import reference
from dist_cautious.optim.base import batches
from dist_cautious.optim.came import CAME, _CamePlan, _ema_, _factor_shapes, _normalised_rsqrt
from dist_cautious.shard.adapters import default_fragments

SHAPES = [(7, 5), (3, 4, 6), (1, 9), (5, 7), (2, 7, 3), (40000, 2), (40000, 3), (2, 33000, 1), (11,), (64, 64), (6, 5), ()]


@pytest.fixture
def two_threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_batched_factor_update_is_the_per_tensor_update_bitwise(two_threads: None) -> None:
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)
    state: dict = defaultdict(dict)
    group = {"params": params}
    fragments = list(default_fragments(params, state))
    factored = [f for f in fragments if f.factored]
    for fragment in factored:
        row_shape, col_shape = _factor_shapes(fragment.global_shape)
        fragment.state["exp_avg_sq_row"] = torch.rand(row_shape, generator=gen) + 0.1
        fragment.state["exp_avg_sq_col"] = torch.rand(col_shape, generator=gen) + 0.1
    before = {id(f): (f.state["exp_avg_sq_row"].clone(), f.state["exp_avg_sq_col"].clone()) for f in factored}
    plan = _CamePlan(batches([(group, fragment) for fragment in fragments], {}), owns_state=True)
    (batch,) = plan.batches
    assert len(batch.segments) == 1  # all local: one segment, ordered by R into runs
    runs = [rows for _, _, rows in batch.segments[0].runs]
    assert runs.count(40000) == 2 and runs.count(7) == 1  # large R one tensor at a time; equal small R batched
    row_sums, col_sums = batch.row_sums[0], batch.col_sums[0]
    for rows, cols in zip(row_sums, col_sums):
        rows.copy_(torch.rand(rows.shape, generator=gen))
        cols.copy_(torch.rand(cols.shape, generator=gen))
    expected = []
    for fragment, rows_sum, cols_sum in zip(factored, row_sums, col_sums):
        rows, cols = (t.clone() for t in before[id(fragment)])
        _ema_(rows.view(-1), 0.999, rows_sum.clone(), fragment.global_shape[-1])
        _ema_(cols.view(-1), 0.999, cols_sum.clone(), fragment.global_shape[-2])
        expected.append((rows, cols, *_normalised_rsqrt(rows.view(-1), cols.view(-1), fragment.global_shape[-2])))
    batch.segments[0].update("exp_avg_sq", 0.999, reference)  # the torch ops (the native kernel: tests/kernels)
    batch.choose_factors(batch.folded)
    factors = {id(f): c for f, c in zip(fragments, batch.factors)}
    for fragment, (rows, cols, row_factor, col_factor, means) in zip(factored, expected):
        assert torch.equal(fragment.state["exp_avg_sq_row"], rows) and torch.equal(fragment.state["exp_avg_sq_col"], cols)
        factor = factors[id(fragment)]
        assert torch.equal(factor.row, row_factor) and torch.equal(factor.col, col_factor), fragment.global_shape
        assert torch.equal(factor.row_means, means) and factor.layout == fragment.layout()
    (vector,) = [f for f in fragments if not f.factored and f.global_shape == (11,)]
    assert factors[id(vector)].elementwise is vector.elementwise_state("exp_avg_sq")


def _trajectory(cautious: bool, strided_grads: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES[:5] + SHAPES[8:]]
    optimizer = CAME([{"params": params[::2]}, {"params": params[1::2], "betas": (0.8, 0.99, 0.999)}], lr=1e-2, weight_decay=0.1, cautious=cautious)
    for _ in range(4):
        for param in params:
            grad = torch.randn(param.shape, generator=gen)
            # a transposed copy: not contiguous, so no step plan: the factor layout is built every
            # step and copies the state in and out instead of owning it
            param.grad = grad.t().contiguous().t() if strided_grads and grad.dim() == 2 else grad
        optimizer.step()
    assert (optimizer._came_plan is None) == strided_grads
    return [p.detach().clone() for p in params] + [optimizer.state[p][key] for p in params for key in sorted(optimizer.state[p])]


@pytest.mark.parametrize("cautious", [False, True])
def test_kept_layout_and_layout_built_every_step_agree_bitwise(cautious: bool) -> None:
    kept, fresh = _trajectory(cautious, False), _trajectory(cautious, True)
    assert len(kept) == len(fresh)
    for a, b in zip(kept, fresh):
        assert torch.equal(a, b)


def test_replaced_factor_state_is_noticed() -> None:
    """The kept layout owns the factor state (the state entries are views into its buffers);
    a state entry replaced from outside makes the next step build it again, from that entry."""
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    for param in params:
        param.grad = torch.randn(4, 3)
    optimizer = CAME(params, lr=1e-2)
    optimizer.step()
    kept = optimizer._came_plan
    optimizer.step()
    assert optimizer._came_plan is kept
    replacement = torch.full((4,), 2.0)
    optimizer.state[params[0]]["exp_avg_sq_row"] = replacement
    optimizer.step()
    assert optimizer._came_plan is not kept
    row = optimizer.state[params[0]]["exp_avg_sq_row"]
    assert row is not replacement and row.min() > 0.999 * 2.0 - 1e-6  # stepped from the replacement


def _reduce_on_two_ranks(rank: int, world_size: int, payload: object) -> list[torch.Tensor]:
    """Rank ``r`` registers ``r + 1`` times the same values: a lone packed buffer on one group
    (reduced in place), and on another group a tensor in full plus chosen entries of a third."""
    import torch.distributed as dist

    from dist_cautious.shard.reducer import BatchedReducer

    other = dist.new_group([0, 1])
    packed = torch.arange(6, dtype=torch.float32) * (rank + 1)
    whole = torch.ones(2, 2) * (rank + 1)
    some = torch.tensor([1.0, 10.0, 100.0, 1000.0]) * (rank + 1)
    storage = packed.untyped_storage().data_ptr()
    reducer = BatchedReducer()
    reducer.add(dist.group.WORLD, packed)
    reducer.add(other, whole)
    reducer.add(other, some, torch.tensor([0, 2]))
    reducer.add(None, torch.zeros(1))  # a whole local tensor: never communicated
    reducer.all_reduce()
    assert packed.untyped_storage().data_ptr() == storage
    return [torch.tensor(float(rank + 1)), packed, whole, some]


def test_reducer_packs_in_place_and_by_index_on_two_ranks() -> None:
    from dist_cautious.local_ranks import run_ranks

    for own, packed, whole, some in run_ranks(_reduce_on_two_ranks, 2):
        assert torch.equal(packed, torch.arange(6, dtype=torch.float32) * 3)
        assert torch.equal(whole, torch.full((2, 2), 3.0))
        # the registered entries summed over both ranks, the others this rank's own
        assert torch.equal(some, torch.stack([torch.tensor(3.0), 10 * own, torch.tensor(300.0), 1000 * own]))
