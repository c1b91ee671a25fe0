"""The CPU kernels as PyTorch custom ops (``torch.ops.dist_cautious_cpu.*``, issue 12).

- Each op's schema and fake implementation are checked by ``torch.library.opcheck`` on the very
  arguments real optimizer steps pass: a kernel that writes an argument its schema calls
  read-only, or a fake that returns another shape or dtype than the kernel, fails here.
- Whole steps of each optimizer run on fake CPU tensors (``FakeTensorMode``): the native kernels'
  fake implementations run in place of the kernels, each kernel once per step, and no op other
  than them writes a param or its state (no silent fallback to the reference path).
- ``torch.compile`` traces a call of the kernels' Python API in one graph (``fullgraph=True``)
  and the compiled call steps exactly as the eager one.
- Outside any dispatch mode the same kernels are called directly (the dispatcher's boxing of
  the long tensor lists is measurable host cost); both routes give identical results.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import dist_cautious.optim as optim
from dist_cautious.kernels import cpu_library, ops_for, routing
from tests.op_counter import StepRecorder

OPS = ops_for(torch.device("cpu"))
pytestmark = pytest.mark.skipif(not hasattr(OPS, "trusted"), reason="native CPU kernels unavailable (CI requires them)")

SHAPES = [(), (7,), (5, 3), (4, 3, 2, 2), (1,), (6, 40)]

#: optimizer factories, and the kernels one step of each runs (each once)
#: came_factor_update runs after each reduction of row / column sums (phases 1 and 3)
_CAME_KERNELS = [
    "came_factored_sq_sums", "came_vector_second_moment", "came_factor_update", "came_update_sumsq", "came_momentum", "came_factor_update",
    "came_apply",
]  # fmt: skip
#: kernels that take per-tensor values, not lists of tensors
_NOT_LISTS = ("came_factor_update", "mask_scales")
CASES: dict[str, tuple[Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], list[str]]] = {
    "CautiousAdamW": (lambda ps: optim.CautiousAdamW(ps, lr=1e-3, weight_decay=0.1), ["adamw_mask_counts", "mask_scales", "adamw_apply"]),
    "AdamW": (lambda ps: optim.CautiousAdamW(ps, lr=1e-3, cautious=False), ["adamw_apply"]),
    "CautiousLion": (lambda ps: optim.CautiousLion(ps, lr=1e-4, weight_decay=0.1), ["lion_encode", "mask_scales", "lion_decode_apply"]),
    "Lion": (lambda ps: optim.CautiousLion(ps, lr=1e-4, cautious=False), ["lion_apply"]),
    "CAME, cautious": (lambda ps: optim.CAME(ps, lr=2e-4, cautious=True, weight_decay=0.01), [*_CAME_KERNELS, "mask_scales"]),
    "CAME": (lambda ps: optim.CAME(ps, lr=2e-4), _CAME_KERNELS),
}


#: CAME's phase 1 splits the tensors: matrices (and batches of them) factored, the rest elementwise
FACTORED = sum(len(shape) >= 2 for shape in SHAPES)
_COVERED = {"came_factored_sq_sums": FACTORED, "came_vector_second_moment": len(SHAPES) - FACTORED}


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def _new_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen).to(param.dtype)


class _KernelCalls(TorchDispatchMode):
    """The arguments of each ``dist_cautious_cpu`` op dispatched, copied before the op ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func.namespace == cpu_library.NAMESPACE:
            self.calls.append((func, tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, args)))
        return func(*args, **(kwargs or {}))


def _recorded_kernel_calls() -> list[tuple[Any, tuple[Any, ...]]]:
    """Second steps of every case (state made by a first), fp32 and bf16 params, and the one
    kernel no optimizer step uses (Lion's separate count, part of the kernels' API)."""
    calls = []
    for dtype in (torch.float32, torch.bfloat16):
        for factory, _ in CASES.values():
            params = _params(dtype)
            optimizer = factory(params)
            _new_grads(params, 1)
            optimizer.step()
            _new_grads(params, 2)
            with _KernelCalls() as recorder:
                optimizer.step()
            calls += recorder.calls
    with _KernelCalls() as recorder:
        OPS.lion_mask_counts([torch.randn(9)], [torch.randn(9)], 0.9)
    return calls + recorder.calls


def test_every_op_passes_opcheck_on_the_arguments_steps_pass() -> None:
    """``test_schema`` runs each op under torch's schema check (every argument the kernel mutates
    must be marked ``(x!)``, nothing else may change); ``test_faketensor`` runs the fake
    implementation and compares its outputs' shapes, dtypes and devices with the kernel's."""
    calls = _recorded_kernel_calls()
    assert {func._opname for func, _ in calls} == set(cpu_library.OPS)
    for func, args in calls:
        torch.library.opcheck(func, args, test_utils=("test_schema", "test_faketensor"))


def _storage(tensor: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(tensor.untyped_storage())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_whole_steps_run_on_fake_cpu_tensors(name: str, dtype: torch.dtype) -> None:
    factory, kernels = CASES[name]
    with FakeTensorMode():
        params = _params(dtype)
        optimizer = factory(params)
        for step in range(2):
            _new_grads(params, step)
            with StepRecorder() as recorder:
                optimizer.step()
            calls = recorder.custom_ops(cpu_library.NAMESPACE)
            assert Counter(op for op, _ in calls) == Counter(kernels), f"step {step + 1}: {[op for op, _ in calls]}"
            covered = {op: len(named["grads"] if "grads" in named else named["params"]) for op, named in calls if op not in _NOT_LISTS}
            expected = {op: _COVERED.get(op, len(SHAPES)) for op in kernels if op not in _NOT_LISTS}
            assert covered == expected, f"step {step + 1}: tensors per kernel {covered}"
            stepped = {_storage(p) for p in params} | {
                _storage(value) for state in optimizer.state.values() for key, value in state.items() if key in ("exp_avg", "exp_avg_sq")
            }
            for func, _, _, named in recorder.calls:
                if func.namespace != cpu_library.NAMESPACE:
                    written = [t for t in recorder.written(func, named) if _storage(t) in stepped]
                    assert not written, f"step {step + 1}: {func} writes a param or its state outside the kernels"


@pytest.mark.parametrize("cautious", [False, True])
def test_batches_of_only_matrices_or_only_vectors_step_under_a_mode(cautious: bool) -> None:
    """Groups that cannot share calls (other betas), one holding only matrices and one only
    vectors: no kernel is called on an empty list (through the dispatcher an op with no tensor
    argument has no kernel to run and raises), and the step equals the one outside the mode."""
    results = []
    for inside_mode in (False, True):
        params = _params()
        matrices = [p for p in params if p.dim() >= 2]
        vectors = [p for p in params if p.dim() < 2]
        optimizer = optim.CAME([{"params": matrices}, {"params": vectors, "betas": (0.8, 0.99, 0.999)}], lr=2e-4, cautious=cautious)
        for step in range(2):
            _new_grads(params, step)
            if inside_mode:
                with StepRecorder():
                    optimizer.step()
            else:
                optimizer.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_fake_ops_reject_mismatched_lists() -> None:
    with FakeTensorMode():
        grads = [torch.randn(4)]
        with pytest.raises(RuntimeError, match="lists differ in length"):
            torch.ops.dist_cautious_cpu.adamw_mask_counts(grads, [], 0.1)
        with pytest.raises(RuntimeError, match="has 5 elements"):
            torch.ops.dist_cautious_cpu.adamw_mask_counts(grads, [torch.zeros(5)], 0.1)
        with pytest.raises(RuntimeError, match="clip divisors"):
            none = [None]
            torch.ops.dist_cautious_cpu.came_momentum(
                grads, [torch.zeros(4)], [0], [0], [1], [1], none, none, none, torch.ones(2), 0.9, 0.1, 1e-16, none, none, none
            )


def _adamw_tensors() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [[torch.randn(n, generator=gen) for n in (5, 64, 1000)] for _ in range(3)] + [[torch.rand(n, generator=gen) for n in (5, 64, 1000)]]


def _adamw_apply(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor]) -> None:
    """The kernels' Python API as the optimizers call it (``CpuOps.adamw_apply``: scalars worked
    out in Python, the route picked, the kernel called)."""
    OPS.trusted().adamw_apply(params, grads, exp_avgs, exp_avg_sqs, [1, 2, 3], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def test_torch_compile_traces_a_kernel_call_in_one_graph() -> None:
    """``fullgraph=True``: a graph break at the kernel would raise. The compiled call writes
    params and both moments exactly as the eager call (same kernel, same inputs)."""
    eager, compiled = _adamw_tensors(), _adamw_tensors()
    _adamw_apply(*eager)
    torch._dynamo.reset()
    torch.compile(_adamw_apply, backend="aot_eager", fullgraph=True)(*compiled)
    for eager_list, compiled_list in zip(eager, compiled):
        assert all(torch.equal(e, c) for e, c in zip(eager_list, compiled_list))
    assert not torch.equal(eager[0][0], _adamw_tensors()[0][0])  # the call did step the params


def test_direct_and_dispatched_routes_step_identically() -> None:
    """The route is chosen per call (``routing.dispatched``); a step taken inside a dispatch
    mode (through the ops) equals one taken outside (direct calls), bit for bit."""
    results = []
    for inside_mode in (False, True):
        params = _params()
        optimizer = optim.CAME(params, lr=2e-4, cautious=True, weight_decay=0.01)
        for step in range(3):
            _new_grads(params, step)
            if inside_mode:
                with StepRecorder() as recorder:
                    optimizer.step()
                assert len(recorder.custom_ops(cpu_library.NAMESPACE)) == len(_CAME_KERNELS) + 1  # and the mask scales
            else:
                assert not routing.dispatched()
                optimizer.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
