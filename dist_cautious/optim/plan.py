"""The step as a plan (issue 12): what a step needs that changes only when the params do, built
on the first step and kept, so a step's Python work does not grow with the number of tensors.

A plan holds the step's fragments (views, layouts, names, checks), the kernel namespace it
checked their tensors for, and the step counts of all its fragments packed in one fp32 tensor
(each ``state["step"]`` is a 0-d view into it, advanced by one op; the values are counted on
the host alongside, never read back). Per-batch tensors the optimizers make once
(``base.batch_sizes``, reduction positions, CAME's factor layout in ``kept``) live as long as
the plan. ``still_valid`` is the cheap check made every step; a gradient that is a new tensor
is rebound without a rebuild.

- ``StepPlan``: plain tensors and DTensors (``default_fragments``: single process, DDP, FSDP2).
- ``PartitionStepPlan``: DeepSpeed ZeRO's flat partitions (``ZeroFragmentSource``). DeepSpeed
  steps one param group (ZeRO-1/2) or one sub-group (ZeRO-3) per ``step()`` call, so the
  optimizer keeps one plan per set of flat partitions it is handed (``PlanCache``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from dist_cautious.kernels import ops_for
from dist_cautious.shard.adapters import local_storage, param_fragments, rebound_grad
from dist_cautious.shard.fragment import Fragment
from dist_cautious.shard.zero import Partition, ZeroFragmentSource

Work = list[tuple[dict[str, Any], Fragment]]


def _native_checked(fragments: Sequence[Fragment]) -> Any:
    """``ops_for``'s native CPU kernels without per-call tensor checks (``CpuOps.trusted``)
    when every tensor of ``fragments`` passes them now, else ``None`` (check per call)."""
    if not fragments or fragments[0].param.device.type != "cpu":
        return None
    ops = ops_for(fragments[0].param.device)
    trusted = getattr(ops, "trusted", None)
    if trusted is None:
        return None
    from dist_cautious.kernels.cpu_ops import native_ok

    values, state = [], []
    for fragment in fragments:
        values += [fragment.param, fragment.grad]
        state += [getattr(v, "_local_tensor", v) for k, v in fragment.state.items() if k != "step" and isinstance(v, Tensor)]
    return trusted() if native_ok(values, state) else None


class Plan:
    """What both plans share: ``work``, the packed step counts and the checked kernels."""

    work: Work
    usable: bool

    def __init__(self) -> None:
        #: what the optimizers keep for as long as this plan lives (CAME's factor layout)
        self.kept: dict[str, Any] = {}

    def _pack_steps(self) -> None:
        initial = [float(f.state["step"]) if "step" in f.state else 0.0 for _, f in self.work]
        self.steps = torch.tensor(initial, dtype=torch.float32)
        #: the counts as host ints, advanced alongside ``steps``: never read back from the tensor
        self.step_values: list[int] = [int(value) for value in initial]
        self.step_views: list[Tensor] = []
        for slot, (_, fragment) in enumerate(self.work):
            fragment.state["step"] = self.steps[slot]
            fragment.step_slot = slot
            self.step_views.append(fragment.state["step"])
        self.step_dicts = [fragment.state for _, fragment in self.work]

    def _steps_installed(self) -> bool:
        """Every ``state["step"]`` is still this plan's view (a load or a full-state setter
        replaces them)."""
        return all(map(operator.is_, map(dict.get, self.step_dicts, ["step"] * len(self.step_dicts)), self.step_views))

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
        self.step_values = [value + 1 for value in self.step_values]

    def commit(self) -> None:
        """After the step: what the plan's fragments need written back (nothing here)."""


class StepPlan(Plan):
    """The plan of a step over plain tensors and DTensors (``default_fragments``).

    ``still_valid``: the same param groups holding the same params, the same ones with a grad,
    the same param storage and the same state dict. A grad that is a new tensor
    (``zero_grad(set_to_none=True)``) is rebound without a rebuild.
    """

    def __init__(self, optimizer: Any) -> None:
        super().__init__()
        self.state = optimizer.state
        self.groups = [(group, list(group["params"])) for group in optimizer.param_groups]
        self.has_grad = [[p.grad is not None for p in params] for _, params in self.groups]
        self.work = []
        #: per fragment of ``work``: param, the grad it is bound to, that grad's storage, param storage
        self.bound: list[list[Any]] = []
        self.usable = True
        for group, params in self.groups:
            for param, fragment in param_fragments(params, optimizer.state):
                if fragment.numel == 0:
                    continue
                if fragment.writeback is not None or not fragment.grad.is_contiguous() or not param.grad.is_contiguous():
                    self.usable = False  # stepped on a copy: rebuilt every step, as without a plan
                self.work.append((group, fragment))
                self.bound.append([param, param.grad, local_storage(param.grad), local_storage(param)])
        if not self.usable:
            return
        self._pack_steps()
        self._set_ops()

    def still_valid(self, optimizer: Any) -> bool:
        """True when the plan still describes ``optimizer``'s params (grads rebound here)."""
        if not _same_params(optimizer, self.state, self.groups):
            return False
        if [[p.grad is not None for p in params] for _, params in self.groups] != self.has_grad:
            return False
        rebound = False
        for (_, fragment), entry in zip(self.work, self.bound):
            param, grad = entry[0], entry[0].grad
            if local_storage(param) != entry[3] or fragment.state.get("step") is None:
                return False
            if grad is not entry[1] or local_storage(grad) != entry[2]:
                if not grad.is_contiguous():
                    return False
                fragment.grad = rebound_grad(param, fragment.name)
                entry[1], entry[2] = grad, local_storage(grad)
                rebound = True
        if rebound and self.usable:
            self._set_ops()
        return True


class PartitionStepPlan(Plan):
    """The plan of a step over DeepSpeed ZeRO's flat partitions: one ``Partition`` (its kept
    fragments) per flat partition with a gradient, in the order of the param groups.

    ``still_valid``: the same groups holding the same flat partitions, the same ones with a
    gradient, each partition's storage and state dicts unchanged, every step count still the
    plan's; a new flat gradient is rebound with one ``split`` per partition.
    """

    def __init__(self, optimizer: Any, source: ZeroFragmentSource) -> None:
        super().__init__()
        self.state = optimizer.state
        self.groups = [(group, list(group["params"])) for group in optimizer.param_groups]
        self.has_grad = [[p.grad is not None for p in params] for _, params in self.groups]
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
        if not _same_params(optimizer, self.state, self.groups):
            return False
        if [[p.grad is not None for p in params] for _, params in self.groups] != self.has_grad:
            return False
        if not all(partition.still_valid(self.state) and partition.rebind_grad() for partition in self.partitions):
            return False
        return self._steps_installed()

    def commit(self) -> None:
        for partition in self.partitions:
            partition.sync_step()


def _same_params(optimizer: Any, state: Any, groups: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
    """``optimizer`` has the state dict and the param groups (the same dicts holding the same
    params, in order) a plan was made for."""
    if optimizer.state is not state or len(optimizer.param_groups) != len(groups):
        return False
    for group, (planned, params) in zip(optimizer.param_groups, groups):
        current = group["params"]
        if group is not planned or len(current) != len(params) or not all(map(operator.is_, current, params)):
            return False
    return True


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
        key = tuple(id(p) for group in optimizer.param_groups for p in group["params"]) + tuple(map(id, optimizer.param_groups))
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
