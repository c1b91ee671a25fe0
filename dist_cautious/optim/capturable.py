"""``capturable=True``: a step that a CUDA graph can capture and replay (issue 12).

A captured graph replays the step's device work and none of its Python, so everything that
changes from step to step must live on the device and be read there: the step counts (the
plan's fp32 counts, on the params' device, advanced by one op) and ``lr`` (a 0-d tensor on the
device, which a scheduler changes in place; a float ``lr`` is fixed into a graph, as it is for
``torch.optim``'s capturable optimizers). The CUDA kernels read each tensor's scalars
(``-lr / (1 - beta1^t)``, ``1 / sqrt(1 - beta2^t)``, ``1 - lr * weight_decay``, ``-lr``) from a
small table made on the device by a few tensor ops (``kernels.cuda_ops``), and their descriptor
tables stay on the device while the tensors stay the same, so nothing is copied from the host.

What it needs, checked before a step changes anything (``ValueError`` naming what is wrong):
the same ``capturable`` in every param group; params stepped in place by a step plan (plain
tensors, DDP, FSDP2 / HSDP: not DeepSpeed's ZeRO, whose step is its own); kernels that read
their scalars from the device (the CUDA kernels, or the tests' CPU-thread build of them);
fp32 / bf16 / fp16 params; neither amsgrad nor cautious weight decay (they run the torch
reference ops, which take their scalars from the host); a tensor ``lr`` on the params' device.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from dist_cautious.kernels import ops_for
from dist_cautious.optim.plan import Plan, Work, reference_only
from dist_cautious.shard.adapters import default_fragments
from dist_cautious.shard.fragment import Fragment


def check_capturable(optimizer: Any) -> None:
    """Raise ``ValueError`` unless a step of ``optimizer`` can run with its scalars on the device
    (see the module). Made before the step plan is looked up, so a refused step changes nothing;
    per param only ``map``s over all params (no Python call per tensor)."""
    owner, groups = optimizer._owner, optimizer.param_groups
    if not all(group.get("capturable") for group in groups):
        raise ValueError(f"{owner}: capturable must be the same in every param group (the step counts of one plan live on one device)")
    if optimizer.fragment_source is not default_fragments:
        raise ValueError(f"{owner}: capturable=True needs params stepped in place (plain tensors, DDP, FSDP2 / HSDP); DeepSpeed ZeRO steps its flat partitions itself")
    params = [param for group in groups for param in group["params"]]
    devices = set(map(_DEVICE, params))
    if len(devices) != 1:
        raise ValueError(f"{owner}: capturable=True needs every param on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    ops = ops_for(device)
    if not getattr(ops, "capturable", False):
        raise ValueError(f"{owner}: capturable=True needs the CUDA kernels (they read lr and the step counts on the device); the params are on {device}")
    if torch.float64 in set(map(_DTYPE, params)):
        raise ValueError(f"{owner}: capturable=True needs fp32, bf16 or fp16 params; float64 params run the torch reference ops")
    for group in groups:
        if reference_only(group):
            raise ValueError(
                f"{owner}: capturable=True does not support amsgrad or cautious weight decay (they run the torch "
                "reference ops, which take lr and the step counts from the host)"
            )
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != device:
            raise ValueError(f"{owner}: capturable=True needs a Tensor lr on the params' device {device}, got one on {lr.device}")


def refuse_capture(optimizer: Any) -> None:
    """A step without ``capturable`` while the current CUDA stream is capturing a graph raises
    ``RuntimeError``, as ``torch.optim``'s optimizers do: its lr and bias corrections are host
    numbers that would be fixed into the graph (the binding refuses them under capture too)."""
    if capturing():
        raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of {optimizer._owner} but param_groups' capturable is False.")


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_plan(optimizer: Any, plan: Optional[Plan]) -> None:
    """After the plan lookup: a capturable step runs on a kept plan (the params' storage and
    grads stepped in place; a plan that is not usable installed nothing)."""
    if plan is None:
        raise ValueError(
            f"{optimizer._owner}: capturable=True needs params and grads the kernels step in place "
            "(contiguous local tensors); these are stepped on copies, which a captured step cannot write back"
        )


_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")


def device_steps(plan: Plan, fragments: Sequence[Fragment]) -> Tensor:
    """The fp32 step counts of ``fragments`` on the device: a view of the plan's counts when
    their slots are consecutive (the usual case), else one gather by an index kept with the
    plan."""
    kept = plan.kept.setdefault("device_steps", {})
    entry = kept.get(id(fragments))
    if entry is None or entry[0] is not fragments:
        slots = [fragment.step_slot for fragment in fragments]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            index: Any = slice(slots[0], slots[0] + len(slots))
        else:
            index = torch.tensor(slots, dtype=torch.long, device=plan.steps.device)
        entry = kept[id(fragments)] = (fragments, index)
    index = entry[1]
    return plan.steps[index] if isinstance(index, slice) else plan.steps.index_select(0, index)


def per_tensor_on_device(batch: Any, key: str, device: torch.device) -> Tensor:
    """A ``Batch``'s group values of ``key`` (``lr``, ``weight_decay``), one float64 per fragment
    on ``device``, made by device ops only: a tensor value is read where it lives (in a captured
    graph, its value at each replay), a float is filled in (fixed into a captured graph)."""
    parts = []
    for group, count in batch.runs:
        value = group[key]
        if isinstance(value, Tensor):
            parts.append(value.to(dtype=torch.float64).reshape(1).expand(count))
        else:
            parts.append(torch.full((count,), float(value), dtype=torch.float64, device=device))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def lr_and_decay(batch: Any) -> dict[str, Any]:
    """The ``lr`` / ``weight_decay`` arguments of a batch's apply call: host numbers
    (``Batch.per_tensor``), or under ``capturable`` float64 tensors on the device."""
    if batch.group.get("capturable"):
        device = batch.fragments[0].param.device
        return {"lr": per_tensor_on_device(batch, "lr", device), "weight_decay": per_tensor_on_device(batch, "weight_decay", device)}
    return {"lr": batch.per_tensor("lr"), "weight_decay": batch.per_tensor("weight_decay")}


def negate_in_place(work: Work) -> None:
    """``maximize`` under ``capturable``: negate the grads of maximizing groups in place (called
    again after the step to restore them; negation is exact, so they come back bit for bit). The
    usual path hands the step new tensors, which a captured step would find at other addresses."""
    grads = [fragment.grad for group, fragment in work if group.get("maximize")]
    if grads:
        torch._foreach_neg_(grads)
