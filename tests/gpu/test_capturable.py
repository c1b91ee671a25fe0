"""``capturable=True``: lr and the step counts on the device, so a CUDA graph can capture a step.

Checked here without a GPU, through the CPU-thread build of the real CUDA sources
(``tests/gpu/cuda_on_cpu``, ``CudaOps(ext, "cpu")``):
- what it refuses, before a step changes anything (CPU kernels, amsgrad, float64, ...);
- a capturable step lands on the bits of the host-scalar step, for every optimizer, with a tensor
  ``lr`` in one group and a float in another, both changed between steps, bf16 params, maximize;
  step counts included (the scalars made on the device from them equal the host's here: the
  CPU's float64 ``pow`` is the C library's, as Python's);
- after one warm-up step, a step with the same tensors runs under a simulated capture (the
  binding's ``simulate_capture``) without uploading a single descriptor table: what a captured
  graph would replay is all in device memory; a step with new grad tensors uploads their tables
  then (a captured backward allocates its grads in the graph's pool), and a host-scalar (not
  capturable) step, whose bias corrections live in its descriptors, raises there.
The capture itself needs a GPU: ``test_cuda_graph_replays_the_step`` (skipped without CUDA)
captures a step in a ``torch.cuda.CUDAGraph`` and replays it against eager steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import dist_cautious.optim as optim
from dist_cautious import kernels
from dist_cautious.kernels.cuda_ops import CudaOps

SHAPES = [(6, 5), (5,), (2, 3, 4), (7,), (4, 4), ()]
#: positions in SHAPES per group: the first group's lr is a 0-d tensor, the second's a float
GROUPS = [[0, 1, 5], [2, 3, 4]]
CASES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "CautiousAdamW": lambda groups, **kw: optim.CautiousAdamW(groups, lr=1e-3, weight_decay=0.1, **kw),
    "AdamW (cautious=False)": lambda groups, **kw: optim.CautiousAdamW(groups, lr=1e-3, weight_decay=0.1, cautious=False, **kw),
    "CautiousLion": lambda groups, **kw: optim.CautiousLion(groups, lr=1e-4, weight_decay=0.1, **kw),
    "Lion (cautious=False)": lambda groups, **kw: optim.CautiousLion(groups, lr=1e-4, weight_decay=0.1, cautious=False, **kw),
    "CAME, cautious": lambda groups, **kw: optim.CAME(groups, lr=2e-4, weight_decay=0.1, cautious=True, **kw),
    "CAME": lambda groups, **kw: optim.CAME(groups, lr=2e-4, weight_decay=0.1, **kw),
}
#: each step's lr for (the tensor group, the float group)
LRS = [(1e-3, 3e-3), (7e-4, 2e-3), (5e-4, 1e-3)]


@pytest.fixture(scope="module")
def ext() -> Any:
    from tests.gpu.cuda_on_cpu.build import load

    return load()


@pytest.fixture(scope="module")
def ops(ext: Any) -> Any:
    return CudaOps(ext, device_type="cpu").namespace()


def _params(dtype: torch.dtype = torch.float32, seed: int = 3) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def _groups(params: list[torch.nn.Parameter], lr_tensor: torch.Tensor, **options: Any) -> list[dict[str, Any]]:
    return [{"params": [params[i] for i in GROUPS[0]], "lr": lr_tensor, **options}, {"params": [params[i] for i in GROUPS[1]], "weight_decay": 0.0, **options}]


def _state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value.detach().clone() for state in optimizer.state.values() for _, value in sorted(state.items()) if isinstance(value, torch.Tensor)]


class _Run:
    """Params with grads, a tensor lr for the first group and a stream of grads: ``step`` sets
    step ``index``'s lrs (the tensor in place, the float replaced) and grads (written in place:
    a captured step reads the same grad tensors), then steps."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.params = _params(dtype)
        self.lr_tensor = torch.tensor(LRS[0][0])
        self.gen = torch.Generator().manual_seed(11)
        for param in self.params:
            param.grad = torch.zeros_like(param)

    def optimizer(self, name: str, capturable: bool, **options: Any) -> torch.optim.Optimizer:
        return CASES[name](_groups(self.params, self.lr_tensor, **options), capturable=capturable)

    def step(self, optimizer: torch.optim.Optimizer, index: int) -> None:
        self.lr_tensor.fill_(LRS[index][0])
        optimizer.param_groups[1]["lr"] = LRS[index][1]
        for param in self.params:
            param.grad.copy_(torch.randn(param.shape, generator=self.gen))
        optimizer.step()


def _run(name: str, capturable: bool, dtype: torch.dtype = torch.float32, steps: int = len(LRS), **options: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Params and state after ``steps`` steps of ``_Run``, lr changing between steps."""
    run = _Run(dtype)
    optimizer = run.optimizer(name, capturable, **options)
    for index in range(steps):
        run.step(optimizer, index)
    return [p.detach().clone() for p in run.params], _state(optimizer)


def _assert_bitwise(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), what
    for index, (a, b) in enumerate(zip(actual, expected)):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), f"{what}: tensor {index} differs"


# ---- refused before anything changes -----------------------------------------------------------


def _assert_refused(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], match: str) -> None:
    _assert_refused_as(optimizer, params, ValueError, match)


def _assert_refused_as(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], error: type[Exception], match: str) -> None:
    before = [p.detach().clone() for p in params]
    with pytest.raises(error, match=match):
        optimizer.step()
    assert not any(optimizer.state.values()), "a refused step left state behind"
    _assert_bitwise([p.detach() for p in params], before, "a refused step changed a param")


def _with_grads(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    for param in params:
        param.grad = torch.ones_like(param)
    return params


@pytest.mark.parametrize("name", list(CASES))
def test_refused_on_the_cpu_kernels(name: str) -> None:
    params = _with_grads(_params())
    _assert_refused(CASES[name](params, capturable=True), params, "needs the CUDA kernels")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"amsgrad": True}, "amsgrad or cautious weight decay"),
        ({"cautious_weight_decay": True}, "amsgrad or cautious weight decay"),
    ],
)
def test_refused_for_what_only_the_reference_ops_do(ops: Any, options: dict[str, Any], match: str) -> None:
    params = _with_grads(_params())
    with kernels.ops_override("cpu", ops):
        _assert_refused(optim.CautiousAdamW(params, capturable=True, **options), params, match)


def test_refused_for_float64_params_mixed_groups_and_a_foreign_lr(ops: Any) -> None:
    with kernels.ops_override("cpu", ops):
        params = _with_grads(_params(torch.float64))
        _assert_refused(optim.CautiousAdamW(params, capturable=True), params, "fp32, bf16 or fp16")
        params = _with_grads(_params())
        mixed = optim.CautiousAdamW([{"params": params[:2]}, {"params": params[2:], "capturable": False}], capturable=True)
        _assert_refused(mixed, params, "the same in every param group")
        foreign = optim.CautiousLion(params, lr=torch.tensor(1e-4, device="meta"), capturable=True)
        _assert_refused(foreign, params, "lr on the params' device")


def test_refused_for_a_backends_own_fragments_and_for_params_stepped_on_copies(ops: Any) -> None:
    with kernels.ops_override("cpu", ops):
        params = _with_grads(_params())
        optimizer = optim.CAME(params, lr=1e-3, capturable=True)
        optimizer.fragment_source = lambda group_params, state: optim.CAME.fragment_source(group_params, state)
        _assert_refused(optimizer, params, "DeepSpeed ZeRO")
        params = _params()
        for param in params:  # a transposed grad: not contiguous, so stepped on a copy
            param.grad = torch.ones(tuple(reversed(param.shape))).permute(tuple(reversed(range(param.dim()))))
        _assert_refused(optim.CautiousAdamW(params, capturable=True), params, "stepped on copies")


# ---- the same bits as the host-scalar step ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_capturable_steps_land_on_the_host_scalar_steps_bits(ops: Any, name: str, dtype: torch.dtype) -> None:
    """Params and every state tensor (``step`` included) after three steps, lr changing."""
    with kernels.ops_override("cpu", ops):
        captured = _run(name, capturable=True, dtype=dtype)
        host = _run(name, capturable=False, dtype=dtype)
    _assert_bitwise(captured[0], host[0], f"{name}: params")
    _assert_bitwise(captured[1], host[1], f"{name}: state")


@pytest.mark.parametrize("name", ["CautiousAdamW", "CAME, cautious"])
def test_maximize_negates_in_place_and_gives_the_grads_back(ops: Any, name: str) -> None:
    """A capturable maximizing step negates the grads in place and back (same tensors, same
    bits afterwards) and steps as the host-scalar maximizing step does."""
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(5)) for shape in SHAPES]
    stepped = {}
    with kernels.ops_override("cpu", ops):
        for capturable in (True, False):
            params = _params()
            optimizer = CASES[name](_groups(params, torch.tensor(1e-3), maximize=True), capturable=capturable)
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            addresses = [p.grad.data_ptr() for p in params]
            optimizer.step()
            _assert_bitwise([p.grad for p in params], grads, f"{name}: grads after a maximizing step")
            assert [p.grad.data_ptr() for p in params] == addresses
            stepped[capturable] = [p.detach() for p in params]
    _assert_bitwise(stepped[True], stepped[False], f"{name}: maximize, capturable vs host scalars")


# ---- nothing to upload once warmed up: what a captured graph would replay --------------------


@pytest.mark.parametrize("name", list(CASES))
def test_a_warmed_up_step_uploads_nothing_under_capture(ext: Any, ops: Any, name: str) -> None:
    """Steps 2 and 3 run under a simulated capture: no descriptor table uploaded (every one the
    kernels read is kept on the device from step 1), and the result is the eager one's."""
    with kernels.ops_override("cpu", ops):
        expected = _run(name, capturable=True)
        run = _Run()
        optimizer = run.optimizer(name, capturable=True)
        uploads = []
        for index in range(len(LRS)):
            ext.simulate_capture(index > 0)
            try:
                before = ext.descriptor_uploads()
                run.step(optimizer, index)
                uploads.append(ext.descriptor_uploads() - before)
            finally:
                ext.simulate_capture(False)
    assert uploads[0] > 0 and uploads[1:] == [0, 0], f"{name}: descriptor tables uploaded per step {uploads}"
    _assert_bitwise([p.detach() for p in run.params], expected[0], f"{name}: params")
    _assert_bitwise(_state(optimizer), expected[1], f"{name}: state")


def test_grads_new_to_the_capture_are_uploaded_and_host_scalars_refused(ext: Any, ops: Any) -> None:
    """Grads at new addresses under capture (a captured backward allocates them from the graph's
    pool) have new descriptor tables: uploaded then, and the step is the eager one. A host-scalar
    AdamW step (bias corrections and lr in its descriptors) is refused under capture: a graph
    would replay them unchanged."""
    with kernels.ops_override("cpu", ops):
        expected = [p.detach().clone() for p in _run("CautiousAdamW", capturable=True, steps=2)[0]]
        params = _params()
        lr_tensor = torch.tensor(LRS[0][0])
        optimizer = CASES["CautiousAdamW"](_groups(params, lr_tensor), capturable=True)
        gen = torch.Generator().manual_seed(11)
        for step in range(2):
            lr_tensor.fill_(LRS[step][0])
            optimizer.param_groups[1]["lr"] = LRS[step][1]
            for param in params:  # new grad tensors each step
                param.grad = torch.randn(param.shape, generator=gen)
            ext.simulate_capture(step > 0)
            try:
                before = ext.descriptor_uploads()
                optimizer.step()
                assert ext.descriptor_uploads() > before, f"step {step + 1}: new grads, yet no table uploaded"
            finally:
                ext.simulate_capture(False)
        _assert_bitwise([p.detach() for p in params], expected, "new grads under capture vs eager")

        params = _with_grads(_params())
        host_scalars = optim.CautiousAdamW(params, cautious=False)
        host_scalars.step()
        ext.simulate_capture(True)
        try:
            with pytest.raises(RuntimeError, match="with host scalars cannot be captured"):
                host_scalars.step()
        finally:
            ext.simulate_capture(False)


def test_a_step_without_capturable_under_capture_raises_as_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.optim's check and message, before the step changes anything (the current stream's
    capture status stands in for a real capture)."""
    from dist_cautious.optim import capturable

    params = _with_grads(_params())
    optimizer = optim.CautiousLion(params)
    monkeypatch.setattr(capturable, "capturing", lambda: True)
    _assert_refused_as(optimizer, params, RuntimeError, "Attempting CUDA graph capture of step\\(\\) for an instance of CautiousLion but param_groups' capturable is False")


# ---- host cost and checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("new_grads", [False, True], ids=["same grads", "new grads"])
@pytest.mark.parametrize("name", list(CASES))
def test_same_dispatch_count_for_10_and_100_tensors(ops: Any, name: str, new_grads: bool) -> None:
    """The device-side scalars cost ops per batch, not per tensor (issue 12's dispatch-count
    test, on the CUDA path with a device lr)."""
    from tests.unit.test_dispatch_count import _ops_in_second_step

    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return CASES[name]([{"params": params, "lr": torch.tensor(1e-3)}], capturable=True)

    with kernels.ops_override("cpu", ops):
        counts = [_ops_in_second_step(factory, count, new_grads) for count in (10, 100)]
    assert counts[0] == counts[1], f"{name}: {counts[0]} ops for 10 tensors, {counts[1]} for 100"


@pytest.mark.parametrize("name", ["CautiousAdamW", "CAME, cautious"])
def test_resume_from_a_state_dict_lands_on_the_uninterrupted_run(ops: Any, name: str) -> None:
    """Two steps, ``state_dict`` into a new capturable optimizer (the counts move to the params'
    device with the plan), one more step: the bits of three uninterrupted steps. The checkpoint
    of a host-scalar optimizer resumes the same way."""
    with kernels.ops_override("cpu", ops):
        expected = _run(name, capturable=True)
        for saved_capturable in (True, False):
            run = _Run()
            first = run.optimizer(name, capturable=saved_capturable)
            run.step(first, 0)
            run.step(first, 1)
            resumed = run.optimizer(name, capturable=True)
            resumed.load_state_dict(first.state_dict())
            resumed.param_groups[0]["lr"] = run.lr_tensor  # a loaded group holds the saved lr value
            resumed.param_groups[0]["capturable"] = resumed.param_groups[1]["capturable"] = True
            run.step(resumed, 2)
            _assert_bitwise([p.detach() for p in run.params], expected[0], f"{name}: resumed from capturable={saved_capturable}")
            _assert_bitwise(_state(resumed), expected[1], f"{name}: state resumed from capturable={saved_capturable}")


# ---- on a GPU: the real capture --------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_graph_replays_the_step(name: str) -> None:
    """Capture one step in a ``torch.cuda.CUDAGraph`` (after three warm-up steps on a side stream,
    as torch's docs ask) and replay it three times, the grads and the tensor lr rewritten in place
    before each replay; an eager capturable optimizer doing the same steps must land on the same
    bits (the same kernels on the same tables), step counts included."""

    def build() -> tuple[list[torch.nn.Parameter], torch.Tensor, torch.optim.Optimizer]:
        params = [p.cuda() for p in _params()]
        params = [torch.nn.Parameter(p.detach()) for p in params]
        lr_tensor = torch.tensor(LRS[0][0], device="cuda")
        groups = [{"params": [params[i] for i in GROUPS[0]], "lr": lr_tensor}, {"params": [params[i] for i in GROUPS[1]], "weight_decay": 0.0}]
        for param in params:
            param.grad = torch.zeros_like(param)
        return params, lr_tensor, CASES[name](groups, capturable=True)

    gen = torch.Generator().manual_seed(11)
    schedule = [([torch.randn(shape, generator=gen) for shape in SHAPES], LRS[step % len(LRS)][0]) for step in range(6)]

    def load(params: list[torch.nn.Parameter], lr_tensor: torch.Tensor, step: int) -> None:
        grads, lr = schedule[step]
        for param, grad in zip(params, grads):
            param.grad.copy_(grad)
        lr_tensor.fill_(lr)

    eager_params, eager_lr, eager = build()
    for step in range(6):
        load(eager_params, eager_lr, step)
        eager.step()

    params, lr_tensor, optimizer = build()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            load(params, lr_tensor, step)
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load(params, lr_tensor, 3)
    with torch.cuda.graph(graph):
        optimizer.step()
    # capture does not run the step: replay it for steps 4, 5 and 6
    graph.replay()
    for step in (4, 5):
        load(params, lr_tensor, step)
        graph.replay()
    torch.cuda.synchronize()
    _assert_bitwise([p.detach() for p in params], [p.detach() for p in eager_params], f"{name}: params")
    _assert_bitwise(_state(optimizer), _state(eager), f"{name}: state")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("name", ["CautiousAdamW", "CAME, cautious"])
def test_whole_network_capture_as_torchs_docs_show_it(name: str) -> None:
    """torch's whole-network recipe: grads set to None before capture, so the captured backward
    allocates them in the graph's pool (tensors the warm-up never had; their descriptor tables
    are uploaded during capture, from host buffers the binding keeps). Replays against eager
    steps of the same model: ``assert_close``'s fp32 defaults, because the backward (cuBLAS),
    not this optimizer, may run other algorithms inside a graph."""
    torch.manual_seed(0)

    def build() -> tuple[torch.nn.Module, torch.Tensor, torch.optim.Optimizer]:
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda()
        model.load_state_dict({k: v.clone() for k, v in initial.items()})
        lr_tensor = torch.tensor(1e-3, device="cuda")
        return model, lr_tensor, _whole_network_optimizer(name, model, lr_tensor)

    initial = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda().state_dict()
    batches = [(torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")) for _ in range(6)]

    eager, _, eager_optimizer = build()
    for x, y in batches:
        eager_optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(eager(x), y).backward()
        eager_optimizer.step()

    model, _, optimizer = build()
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(static_x), static_y).backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(model(static_x), static_y).backward()
        optimizer.step()
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for (key, value), (_, expected) in zip(model.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(value, expected, msg=f"{name}: {key}")


def _whole_network_optimizer(name: str, model: torch.nn.Module, lr_tensor: torch.Tensor) -> torch.optim.Optimizer:
    return CASES[name]([{"params": list(model.parameters()), "lr": lr_tensor}], capturable=True)
