"""The step as a plan (issue 12): what a step needs that changes only when the params do, built
on the first step and kept, so a step's Python work does not grow with the number of tensors.

A plan holds the step's fragments (views, layouts, names, checks), the kernel namespace it
checked their tensors for, and the step counts of all its fragments packed in one fp32 tensor
(each ``state["step"]`` is a 0-d view into it, advanced by one op; the values are counted on
the host alongside, never read back; with ``capturable=True`` the tensor is on the params'
device and nothing is counted on the host). Per-batch tensors the optimizers make once
(``base.batch_sizes``, reduction positions, CAME's factor layout in ``kept``) live as long as
the plan. ``still_valid`` is the cheap check made every step, which also binds the gradients
of the step (a plan lets go of them after it: see ``StepPlan``).

- ``StepPlan``: plain tensors and DTensors (``default_fragments``: single process, DDP, FSDP2).
- ``PartitionStepPlan``: DeepSpeed ZeRO's flat partitions (``ZeroFragmentSource``). DeepSpeed
  steps one param group (ZeRO-1/2) or one sub-group (ZeRO-3) per ``step()`` call, so the
  optimizer keeps one plan per set of flat partitions it is handed (``PlanCache``).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from dist_cautious.kernels import ops_for
from dist_cautious.shard.adapters import local_storage, param_fragments
from dist_cautious.shard.fragment import Fragment
from dist_cautious.shard.zero import Partition, ZeroFragmentSource

Work = list[tuple[dict[str, Any], Fragment]]


def _native_checked(fragments: Sequence[Fragment]) -> Any:
    """``ops_for``'s native kernels without per-call tensor checks (``CpuOps.trusted``,
    ``CudaOps.trusted``) when every tensor of ``fragments`` passes their check (``native_ok``)
    now, else ``None`` (checked per call). A plan rebinds only grads that still fit what it
    checked here (``StepPlan._bind_grads``)."""
    if not fragments:
        return None
    ops = ops_for(fragments[0].param.device)
    trusted, native_ok = getattr(ops, "trusted", None), getattr(ops, "native_ok", None)
    if trusted is None or native_ok is None:
        return None
    values, state = [], []
    for fragment in fragments:
        values += [fragment.param, fragment.grad]
        state += [_local(v) for k, v in fragment.state.items() if k != "step" and isinstance(v, Tensor)]
    return trusted() if native_ok(values, state) else None


class Plan:
    """What both plans share: ``work``, the packed step counts and the checked kernels."""

    work: Work
    usable: bool

    def __init__(self, optimizer: Any) -> None:
        #: what the optimizers keep for as long as this plan lives (CAME's factor layout)
        self.kept: dict[str, Any] = {}
        self.state = optimizer.state
        self.groups = [(group, list(group["params"])) for group in optimizer.param_groups]
        self.has_grad = [[p.grad is not None for p in params] for _, params in self.groups]
        #: step counts on the device, read there by the kernels (``capturable=True``, see
        #: ``optim.capturable``); else fp32 on the CPU with host ints alongside
        self.capturable = any(group.get("capturable") for group in optimizer.param_groups)
        self.step_values: Optional[list[int]] = None

    def _same_groups(self, optimizer: Any) -> bool:
        """``optimizer`` has the state dict and the param groups (the same dicts holding the same
        params, in order) this plan was made for, and the same of those params have a grad."""
        if optimizer.state is not self.state or len(optimizer.param_groups) != len(self.groups):
            return False
        if any(group.get("capturable") for group in optimizer.param_groups) != self.capturable:
            return False
        for group, (planned, params) in zip(optimizer.param_groups, self.groups):
            current = group["params"]
            if group is not planned or len(current) != len(params) or not all(map(operator.is_, current, params)):
                return False
        return [[p.grad is not None for p in params] for _, params in self.groups] == self.has_grad

    def _pack_steps(self) -> None:
        if self.capturable:
            self._pack_device_steps()
        else:
            initial = [float(f.state["step"]) if "step" in f.state else 0.0 for _, f in self.work]
            self.steps = torch.tensor(initial, dtype=torch.float32)
            #: the counts as host ints, advanced alongside ``steps``: never read back from the tensor
            self.step_values = [int(value) for value in initial]
        self.step_views: list[Tensor] = []
        for slot, (_, fragment) in enumerate(self.work):
            fragment.state["step"] = self.steps[slot]
            fragment.step_slot = slot
            self.step_views.append(fragment.state["step"])
        self.step_dicts = [fragment.state for _, fragment in self.work]

    def _pack_device_steps(self) -> None:
        """``capturable``: the counts live on the params' device (as ``torch.optim`` keeps
        ``state["step"]`` when capturable) and are never counted on the host, since a replayed
        CUDA graph advances them without running any Python; the kernels read them there
        (``step_counts`` hands them out). Made from the saved counts by device ops, with no
        read back (a plan may be made on fake tensors)."""
        device = self.work[0][1].param.device if self.work else torch.device("cpu")  # one device: capturable.check_capturable
        zero = torch.zeros((), dtype=torch.float32, device=device)
        initial = [fragment.state["step"].to(device=device, dtype=torch.float32) if isinstance(fragment.state.get("step"), Tensor)
                   else zero + float(fragment.state.get("step", 0.0)) for _, fragment in self.work]  # fmt: skip
        self.steps = torch.stack(initial) if initial else zero.new_zeros(0)
        self.step_values = None

    def _steps_installed(self) -> bool:
        """Every ``state["step"]`` is still this plan's view (a load or a full-state setter
        replaces them)."""
        return all(map(operator.is_, map(dict.get, self.step_dicts, itertools.repeat("step")), self.step_views))

    def _set_ops(self) -> None:
        by_device: dict[torch.device, list[Fragment]] = {}
        for _, fragment in self.work:
            by_device.setdefault(fragment.param.device, []).append(fragment)
        for fragments in by_device.values():
            ops = _native_checked(fragments)
            for fragment in fragments:
                fragment.ops = ops

    def advance_steps(self) -> None:
        """Every fragment's step count + 1, in one op; their values for this step, counted on
        the host as well, so a step never reads tensor data back (``.tolist()`` would sync a
        device-resident counter, and raises on the fake tensors of tests/gpu/test_fake_cuda_step.py)."""
        self.steps.add_(1)
        if self.step_values is not None:
            self.step_values = list(map((1).__add__, self.step_values))

    def commit(self) -> None:
        """After the step: what the plan writes back or lets go of (per plan kind)."""


class StepPlan(Plan):
    """The plan of a step over plain tensors and DTensors (``default_fragments``).

    ``still_valid``: the same param groups holding the same params, the same ones with a grad,
    the same param storage and the same state dict; the checks run as ``map`` over lists kept
    in the plan (no Python function call per tensor).

    Gradients are not kept between steps: after a step the fragments let go of them
    (``commit``), so a gradient the user drops (``zero_grad(set_to_none=True)``, or
    ``model.zero_grad()`` as Hugging Face's Trainer calls it) is freed then, as with
    ``torch.optim``, instead of living through the next forward and backward. Each step binds
    the params' current grads, after checking they still fit the kernels checked at build (same
    dtype and device, contiguous, the param's placements). The native kernels read any
    contiguous tensor as flat, so a fragment stepped by them takes its local grad as it is;
    a group that runs the torch reference ops (cautious weight decay, amsgrad, no native
    kernels) takes flat ``view``s of its grads of two or more dims.
    """

    def __init__(self, optimizer: Any) -> None:
        super().__init__(optimizer)
        self.work = []
        #: the param of each fragment of ``work``
        self.params: list[Tensor] = []
        self.usable = True
        for group, params in self.groups:
            for param, fragment in param_fragments(params, optimizer.state):
                if fragment.numel == 0:
                    continue
                if fragment.writeback is not None or not fragment.grad.is_contiguous() or not param.grad.is_contiguous():
                    self.usable = False  # stepped on a copy: rebuilt every step, as without a plan
                self.work.append((group, fragment))
                self.params.append(param)
        if not self.usable:
            return
        from dist_cautious.shard.dtensor import is_dtensor  # imported on first use, as by param_fragments

        self.is_dtensor = is_dtensor
        self.fragments = [fragment for _, fragment in self.work]
        self.dtensor_params = [p for p in self.params if is_dtensor(p)]
        self.dtensor_locals = list(map(_LOCAL, self.dtensor_params))
        self.dtensor_indices = [index for index, p in enumerate(self.params) if is_dtensor(p)]
        self.dtensor_placements = [self.params[index].placements for index in self.dtensor_indices]
        #: fake tensors (FakeTensorMode) have no data address: their storages are compared instead
        self.fake = any(isinstance(_local(p), FakeTensor) for p in self.params)
        self.param_locals = list(map(_local, self.params))
        self.param_keys = self._storage_keys(self.param_locals)
        grad_locals = [_local(p.grad) for p in self.params]
        self.grad_dtypes = list(map(_DTYPE, grad_locals))
        self.grad_devices = list(map(_DEVICE, grad_locals))
        self._pack_steps()
        self._set_ops()
        #: per param group: the group, and the positions of its fragments whose grads are not
        #: 1-D (viewed flat for the reference ops); whether the native kernels step all of them
        self.by_group: list[tuple[dict[str, Any], list[int], bool]] = []
        for group, _ in self.groups:
            positions = [index for index, (owner, _) in enumerate(self.work) if owner is group]
            multi_dim = [index for index in positions if self.param_locals[index].dim() != 1]
            native = all(self.fragments[index].ops is not None for index in positions)
            self.by_group.append((group, multi_dim, native))

    def _locals(self, tensors: list[Tensor]) -> list[Tensor]:
        """The local tensors of ``tensors`` (one per fragment; DTensors at ``dtensor_indices``)."""
        if not self.dtensor_indices:
            return list(tensors)
        if len(self.dtensor_indices) == len(tensors):
            return list(map(_LOCAL, tensors))
        local = list(tensors)
        for index, value in zip(self.dtensor_indices, map(_LOCAL, [tensors[i] for i in self.dtensor_indices])):
            local[index] = value
        return local

    def _storage_keys(self, tensors: list[Tensor]) -> list[Any]:
        return list(map(local_storage, tensors)) if self.fake else list(map(Tensor.data_ptr, tensors))

    def still_valid(self, optimizer: Any) -> bool:
        """True when the plan still describes ``optimizer``'s params (grads bound here)."""
        if not self._same_groups(optimizer):
            return False
        if not self.usable:
            return True  # the same params: still stepped on fresh fragments
        if not all(map(operator.is_, map(_LOCAL, self.dtensor_params), self.dtensor_locals)):
            return False
        if self._storage_keys(self.param_locals) != self.param_keys or not self._steps_installed():
            return False
        return self._bind_grads(list(map(_GRAD, self.params)))

    def _bind_grads(self, grads: list[Tensor]) -> bool:
        """Give every fragment its param's current local grad (flat, see the class); ``False``
        when one no longer fits what the plan checked (rebuild). Each check is one ``map``
        over all grads."""
        dtensor_grads = [grads[index] for index in self.dtensor_indices]
        if not all(map(self.is_dtensor, dtensor_grads)) or list(map(_PLACEMENTS, dtensor_grads)) != self.dtensor_placements:
            return False  # the rebuild names what is wrong (``dtensor.local_grad``)
        locals_now = self._locals(grads)
        if list(map(_DTYPE, locals_now)) != self.grad_dtypes or list(map(_DEVICE, locals_now)) != self.grad_devices:
            return False
        if not all(map(Tensor.is_contiguous, locals_now)):
            return False
        for group, multi_dim, native in self.by_group:
            if native and not reference_only(group):
                continue
            for index, view in zip(multi_dim, map(Tensor.view, [locals_now[i] for i in multi_dim], itertools.repeat(-1))):
                locals_now[index] = view
        for fragment, grad in zip(self.fragments, locals_now):
            fragment.grad = grad
        return True

    def commit(self) -> None:
        """Let go of this step's gradients (see the class)."""
        for fragment in self.fragments:
            fragment.grad = None  # type: ignore[assignment]


def reference_only(group: dict[str, Any]) -> bool:
    """A group that asks for what only the torch reference ops implement (``kernels.reference``):
    cautious weight decay with a nonzero decay, and amsgrad."""
    return bool(group.get("cautious_weight_decay") and group["weight_decay"]) or bool(group.get("amsgrad"))


def _local(tensor: Tensor) -> Tensor:
    """The local tensor of a DTensor, else the tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


_LOCAL = operator.attrgetter("_local_tensor")
_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_PLACEMENTS = operator.attrgetter("placements")


class PartitionStepPlan(Plan):
    """The plan of a step over DeepSpeed ZeRO's flat partitions: one ``Partition`` (its kept
    fragments) per flat partition with a gradient, in the order of the param groups.

    ``still_valid``: the same groups holding the same flat partitions, the same ones with a
    gradient, each partition's storage and state dicts unchanged, every step count still the
    plan's; a new flat gradient is rebound with one ``split`` per partition.
    """

    def __init__(self, optimizer: Any, source: ZeroFragmentSource) -> None:
        super().__init__(optimizer)
        self.partitions: list[Partition] = []
        self.work = []
        for group, flats in self.groups:
            for flat in flats:
                if flat.grad is None:
                    continue
                partition = Partition(flat, source.pieces(flat), optimizer.state[flat], source.partition_keys)
                self.partitions.append(partition)
                self.work.extend((group, fragment) for fragment in partition.fragments if fragment.numel > 0)
        self.flats = {id(partition.flat) for partition in self.partitions}
        self.usable = all(partition.flat.grad.is_contiguous() for partition in self.partitions)
        self._pack_steps()
        self._set_ops()

    def still_valid(self, optimizer: Any) -> bool:
        if not self._same_groups(optimizer):
            return False
        if not all(partition.still_valid(self.state) and partition.rebind_grad() for partition in self.partitions):
            return False
        return self._steps_installed()

    def commit(self) -> None:
        for partition in self.partitions:
            partition.sync_step()
            partition.release_grad()


class PlanCache:
    """The plans of an optimizer, one per set of params it is handed: one for plain tensors and
    DTensors; under DeepSpeed one per param group (ZeRO-1/2) or sub-group (ZeRO-3), which it
    steps in turn. A plan made for a flat partition drops any other plan holding it (the step
    counts it installed are the new plan's)."""

    def __init__(self) -> None:
        self.plans: dict[tuple[int, ...], Plan] = {}

    def clear(self) -> None:
        self.plans.clear()

    def plan_for(self, optimizer: Any, source: Any) -> Optional[Plan]:
        """The plan of this step (kept, or made now), or ``None`` when the step runs on fresh
        fragments (params stepped on copies; an unknown fragment source)."""
        groups = optimizer.param_groups
        key = tuple(map(id, itertools.chain(groups, *(group["params"] for group in groups))))
        plan = self.plans.get(key)
        if plan is None or not plan.still_valid(optimizer):
            plan = self._make(optimizer, source)
            if plan is None:
                return None
            self.plans[key] = plan
        return plan if plan.usable else None

    def _make(self, optimizer: Any, source: Any) -> Optional[Plan]:
        if isinstance(source, ZeroFragmentSource):
            plan: Plan = PartitionStepPlan(optimizer, source)
            overlapping = [k for k, other in self.plans.items() if getattr(other, "flats", set()) & plan.flats]  # type: ignore[attr-defined]
            for k in overlapping:
                del self.plans[k]
            return plan
        from dist_cautious.shard.adapters import default_fragments

        if source is default_fragments:
            self.plans.clear()
            return StepPlan(optimizer)
        return None
