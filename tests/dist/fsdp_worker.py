"""What each rank runs in the FSDP2 / HSDP tests: train the awkward model, return full weights.

Every rank trains on the whole global batch (see ``train``). A case is a dict: ``optimizer``, ``cautious``, ``mesh`` ("fsdp" 1-D, "hsdp" 2-D replicate x
shard, or "ddp": plain tensors), ``steps``, ``mixed_precision``, ``offload``, ``model`` ("awkward" or "deep": more
tensors), ``options`` (the optimizer's keyword flags, as (name, value) pairs), ``cuda_emulated`` (see ``train``), ``dtype`` ("float64": params, data and returned weights in float64; default fp32), and optionally ``load_from`` / ``save_to`` (a torch.distributed.checkpoint directory)
with ``first_step``. Every rank returns, per case, the full weights (``full_tensor``) and how
many all-reduces each ``optimizer.step()`` issued.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from tests.dist.awkward_model import batch, loss_fn, make_model
from tests.dist.optimizer_cases import make_optimizer


def make_deep_model(seed: int = 0) -> nn.Module:
    """Many more tensors than the awkward model, same input/output, for collective counting."""
    torch.manual_seed(seed)

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(27, 7)] + [nn.Linear(7, 7) for _ in range(6)] + [nn.Linear(7, 2)])

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            hidden = images.flatten(1)
            for layer in self.layers:
                hidden = torch.tanh(layer(hidden))
            return hidden

    return Deep()


def build(case: dict[str, Any], world_size: int) -> nn.Module:
    model = make_model() if case.get("model", "awkward") == "awkward" else make_deep_model()
    model = model.to(dtype_of(case))
    if world_size == 0:  # single-process reference: plain tensors
        return model
    if case.get("mesh") == "ddp":
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if case.get("mesh", "fsdp") == "hsdp":
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if case.get("mixed_precision"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if case.get("offload"):
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for child in model.modules():
        is_leaf_layer = child is not model and not list(child.children())
        if is_leaf_layer and any(p.requires_grad for p in child.parameters()):
            fully_shard(child, **kwargs)
    fully_shard(model, **kwargs)
    return model


def dtype_of(case: dict[str, Any]) -> torch.dtype:
    return torch.float64 if case.get("dtype") == "float64" else torch.float32


def count_all_reduces(optimizer: torch.optim.Optimizer) -> list[int]:
    """Wrap ``optimizer.step`` so each call records how many all-reduces it issued."""
    counts: list[int] = []
    original_step = optimizer.step

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        calls = [0]
        real_all_reduce = dist.all_reduce

        def all_reduce(*a: Any, **k: Any) -> Any:
            calls[0] += 1
            return real_all_reduce(*a, **k)

        dist.all_reduce = all_reduce
        try:
            return original_step(*args, **kwargs)
        finally:
            dist.all_reduce = real_all_reduce
            counts.append(calls[0])

    optimizer.step = counted_step  # type: ignore[method-assign]
    return counts


def train(case: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """``world_size == 0`` trains the plain single-process reference on the global batch. A case
    with ``cuda_emulated`` steps CPU tensors with the CUDA kernels' sources built for CPU threads
    (``tests/gpu/cuda_on_cpu``), the path ``capturable=True`` needs."""
    if not case.get("cuda_emulated"):
        return _train(case, rank, world_size)
    from dist_cautious import kernels
    from dist_cautious.kernels.cuda_ops import CudaOps
    from tests.gpu.cuda_on_cpu.build import load

    with kernels.ops_override("cpu", CudaOps(load(), device_type="cpu").namespace()):
        return _train(case, rank, world_size)


def _train(case: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    model = build(case, world_size)
    optimizer = make_optimizer(case["optimizer"], case["cautious"], model.parameters(), **dict(case.get("options", ())))
    first = case.get("first_step", 0)
    if "load_from" in case:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        # A param that never had a gradient has no optimizer state in the checkpoint, while the
        # template torch builds for loading initialises state for every trainable param.
        dcp.load(state, checkpoint_id=case["load_from"], planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    counts = count_all_reduces(optimizer)
    for step in range(first, first + case["steps"]):
        # Every rank feeds the whole global batch: the averaged gradient then equals the
        # single-process one to an ulp, so the comparison isolates the optimizer. With a split
        # batch, cancellation in the per-rank sums makes small gradients differ by up to 1e-3
        # relative, which Adam-style normalisation passes on to the weights.
        images, targets = (t.to(dtype_of(case)) for t in batch(step))
        loss_fn(model, images, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    if "save_to" in case:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=case["save_to"])
    weights = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        weights[name.removeprefix("module.")] = full.detach().to(dtype_of(case)).clone()
    state_dtypes = {v.dtype for s in optimizer.state.values() for k, v in s.items() if k != "step"}
    return {"weights": weights, "all_reduces": counts, "state_dtypes": state_dtypes}


def run_cases(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [train(case, rank, world_size) for case in cases]


def refused_placements(rank: int, world_size: int, _: Any) -> list[str]:
    """Step DTensors whose placements the fragment layer cannot handle; return the errors."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from dist_cautious import CautiousAdamW

    errors = []
    flat_mesh = init_device_mesh("cpu", (world_size,))
    square_mesh = init_device_mesh("cpu", (1, world_size))
    for mesh, placements in ((flat_mesh, [Shard(1)]), (square_mesh, [Shard(0), Shard(0)])):
        torch.manual_seed(0)
        param = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, placements))
        param.grad = distribute_tensor(torch.randn(4, 6), mesh, placements)
        before = param.full_tensor().clone()
        try:
            CautiousAdamW([param]).step()
            errors.append("no error")
        except ValueError as error:
            errors.append(str(error))
        assert torch.equal(param.full_tensor(), before), "a refused step changed the param"
    return errors


def dispatch_counts(rank: int, world_size: int, layer_counts: list[int]) -> dict[str, list[int]]:
    """Per optimizer setting, the ops the SECOND ``step()`` dispatches (TorchDispatchMode; the
    native kernels count as one op each) on FSDP2 models of ``layer_counts`` Linear(8, 8) layers
    (two tensors each), with the grads of one backward kept across both steps."""
    from dist_cautious import CAME, CautiousAdamW, CautiousLion
    from tests.op_counter import CountOps

    factories = {
        "CautiousAdamW": lambda ps: CautiousAdamW(ps, lr=1e-3),
        "CautiousLion": lambda ps: CautiousLion(ps, lr=1e-4),
        "CAME": lambda ps: CAME(ps, lr=2e-4),
        "CAME, cautious=True": lambda ps: CAME(ps, lr=2e-4, cautious=True),
    }
    mesh = init_device_mesh("cpu", (world_size,))
    counts: dict[str, list[int]] = {}
    for name, factory in factories.items():
        for layers in layer_counts:
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model(torch.randn(4, 8)).square().sum().backward()
            optimizer = factory(model.parameters())
            optimizer.step()
            with CountOps() as counter:
                optimizer.step()
            counts.setdefault(name, []).append(counter.count)
    return counts
