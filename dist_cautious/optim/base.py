"""What the three optimizers share: argument checks, and a step that works on fragments.

``step()`` checks every gradient and every group before touching anything (a step that raises
changes nothing), asks the fragment source for the local pieces of each param that has a
gradient, and hands them, with their group's hyperparameters, to the optimizer's phases in one
call, so that the partial sums of all groups share one reduction per phase.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from dist_cautious.kernels import ops_for, reference
from dist_cautious.kernels.reference import PerTensor
from dist_cautious.optim.capturable import check_capturable, check_plan, device_steps, negate_in_place, refuse_capture
from dist_cautious.optim.plan import _DTYPE, _GRAD, Plan, PlanCache, Work, reference_only
from dist_cautious.shard.adapters import FragmentSource, default_fragments
from dist_cautious.shard.fragment import Fragment, state_dtype
from dist_cautious.shard.reducer import BatchedReducer

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_lr(lr: Any, owner: str) -> None:
    if lr is None:
        raise ValueError(f"{owner}: lr is required")
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{owner}: Tensor lr must be 1-element, got shape {tuple(lr.shape)}")  # torch.optim's error
        if not lr.is_floating_point():
            raise TypeError(f"{owner}: Tensor lr must be floating point, got {lr.dtype}")
        if lr.device.type != "cpu":
            return  # reading a device lr would wait for the device every step (and a captured step cannot)
        lr = lr.item()
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{owner}: lr must be a finite number >= 0, got {lr!r}")


def check_nonnegative(value: Any, name: str, owner: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


def check_betas(betas: Any, count: int, owner: str) -> tuple[float, ...]:
    """Betas arrive as tuples from Python and as lists from DeepSpeed JSON: accept both."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"{owner}: betas must be {count} numbers, got {betas!r}")
    betas = [beta.item() if isinstance(beta, Tensor) and beta.numel() == 1 else beta for beta in betas]  # torch.optim takes 1-element tensors
    for index, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{owner}: betas[{index}] must be in [0, 1), got {beta!r}")
    return tuple(float(beta) for beta in betas)


def check_flag(value: Any, name: str, owner: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")


def refuse_torch_only_options(owner: str, **options: Any) -> None:
    """``torch.optim``'s implementation switches that ask for something these optimizers do not
    do raise ``ValueError`` naming the option; the values that ask for what they always do pass:
    ``foreach`` / ``fused`` None or True (every step is a multi-tensor fused kernel per param
    group), ``differentiable`` False."""
    wanted = {"foreach": (None, True), "fused": (None, True), "differentiable": (False,)}
    for name, value in options.items():
        if value not in wanted[name]:
            why = {
                "foreach": "every step already runs multi-tensor kernels; a per-tensor loop is not offered",
                "fused": "every step already runs fused kernels; an unfused path is not offered",
                "differentiable": "the step runs under no_grad in fused kernels; autograd through it is not supported",
            }[name]
            raise ValueError(f"{owner}: {name}={value!r} is not supported ({why})")


def step_count(state: dict[str, Any]) -> int:
    """Advance and return the per-tensor step (kept in the state, never in the group:
    ZeRO-3 calls ``step()`` once per sub-group)."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    elif not isinstance(state["step"], Tensor):  # a Python number from an older state_dict, as torch accepts
        state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
    state["step"] += 1
    return int(state["step"].item())


class FragmentOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose math runs on fragments of (possibly sharded) tensors."""

    #: replaced by the DeepSpeed integration, which knows the flat partitions' layout
    fragment_source: FragmentSource = staticmethod(default_fragments)
    #: per-element state keys that EVERY tensor has. Under ZeRO these are stored shaped like
    #: DeepSpeed's flat partition (its checkpoint and universal-checkpoint format); any other
    #: per-element key is stored per tensor, sized by the tensor's local piece
    partition_state_keys: tuple[str, ...] = ("exp_avg",)

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._plans = PlanCache()
        self._plan_in_use: Optional[Plan] = None
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @property
    def _owner(self) -> str:
        """The name errors start with (a property: it survives pickling, which keeps only
        ``defaults``, ``state`` and ``param_groups``)."""
        return type(self).__name__

    def __getstate__(self) -> dict[str, Any]:
        """``Optimizer.__getstate__``, plus a mark when a backend installed its fragment source
        (DeepSpeed): that source is not carried over, and a copy stepping without it would step
        flat partitions as whole tensors, so a copy so marked refuses to step."""
        state = super().__getstate__()
        if "fragment_source" in self.__dict__:
            state["_lost_fragment_source"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans, self._plan_in_use = PlanCache(), None
        for group in self.param_groups:
            self.check_hyperparameters(group)

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the argument; may normalise values in place."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self.check_hyperparameters(merged)
        super().add_param_group(param_group)
        for param in self.param_groups[-1]["params"]:
            if param.is_complex():
                raise TypeError(f"{self._owner}: complex params are not supported")
            if param.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{self._owner}: params must be floating point, got {param.dtype}")
        for key in ("betas", "eps"):
            if isinstance(self.param_groups[-1].get(key), list):
                self.param_groups[-1][key] = tuple(self.param_groups[-1][key])

    def _check_before_step(self) -> None:
        if self.__dict__.get("_lost_fragment_source") and "fragment_source" not in self.__dict__:
            raise RuntimeError(
                f"{self._owner}: this optimizer is a copy (deepcopy / pickle) of one a backend (DeepSpeed) had "
                "installed its fragment source on; the copy would step flat partitions as whole tensors. "
                "Copy the model engine's state_dict instead, or build the engine again."
            )
        for group in self.param_groups:
            self.check_hyperparameters(group)
            if _grads_look_right(group["params"]):
                continue
            for param in group["params"]:  # find the first wrong gradient and name what is wrong
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ValueError(f"{self._owner}: sparse gradients are not supported")
                if grad.is_complex() or grad.dtype not in _FLOAT_DTYPES:
                    raise TypeError(f"{self._owner}: gradients must be real floating point, got {grad.dtype}")
                if grad.shape != param.shape:
                    raise ValueError(f"{self._owner}: gradient shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, keeping floating state in the dtype of this optimizer's
        math (``state_dtype``: fp32 for fp32 / bf16 / fp16 params, float64 for float64) where
        torch casts it to the param's own dtype (bf16 momentum would lose bits and no longer fit
        the kernels); ``step`` as torch keeps it. The step plans, which point into the old
        state, are dropped."""
        self._plans.clear()
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[param] = _placed_state(param, state_dict["state"][saved_id])

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimizer step over all param groups; returns the closure's loss, if any.

        Never traced by ``torch.compile``: a compiled training step or
        ``torch.compile(optimizer.step)`` runs it eagerly, as a graph break. The step is host
        bookkeeping around the kernels (a kept plan, checked each step); traced, dynamo would
        guard on all of it and gains nothing, and it failed inside dynamo on the plan's step
        counters. ``torch._disable_dynamo`` is ``torch.compiler.disable`` imported on first call,
        as torch.optim marks its own ``zero_grad`` and ``state_dict``: importing dynamo when this
        module is imported would add warning filters to the user's program."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()
        capturable = any(group.get("capturable") for group in self.param_groups)
        if capturable:
            check_capturable(self)
        else:
            refuse_capture(self)
        self._plan_in_use = plan = self._plans.plan_for(self, self.fragment_source)
        if capturable:
            check_plan(self, plan)
        if plan is not None:
            plan.advance_steps()
            work = plan.work
        else:
            work = self._fresh_work()
        if work:
            maximizing = any(group.get("maximize") for group in self.param_groups)
            if maximizing and capturable:  # in place: a captured step must not allocate new grads
                restore = []
                negate_in_place(work)
            else:
                restore = _negate_grads_to_maximize(work) if maximizing else []
            try:
                self.step_fragments(work)
            finally:
                for fragment, grad in restore:
                    fragment.grad = grad
                if maximizing and capturable:
                    negate_in_place(work)
            if plan is None:
                for _, fragment in work:
                    fragment.commit()
            else:
                plan.commit()
        return loss

    def _fresh_work(self) -> Work:
        work: Work = []
        for group in self.param_groups:
            fragments = self.fragment_source(group["params"], self.state)
            work.extend((group, fragment) for fragment in fragments if fragment.numel > 0)
        return work

    def step_counts(self, fragments: Sequence[Fragment]) -> Union[list[int], Tensor]:
        """Each fragment's step count for this step, advanced once per step: by the step plan
        for all its fragments at once, else here per fragment (``step_count``). Host ints, or
        under ``capturable=True`` the plan's fp32 counts on the device (``capturable.device_steps``)."""
        plan = getattr(self, "_plan_in_use", None)
        if plan is not None:
            values = plan.step_values
            if values is None:
                return device_steps(plan, fragments)
            return [values[f.step_slot] for f in fragments]
        return [step_count(f.state) for f in fragments]

    def step_fragments(self, work: Work) -> None:
        """The optimizer's phases over every (group, fragment) pair of this step."""
        raise NotImplementedError

    def elementwise_states(self, fragments: list[Fragment], key: str) -> list[Tensor]:
        """``[f.elementwise_state(key) for f in fragments]``; for a batch of the step plan in
        use, made once and kept with it while every fragment's state still holds the same
        tensor under ``key`` (one ``map`` to check, no Python call per tensor)."""
        plan = self._plan_in_use
        if plan is None:
            return [f.elementwise_state(key) for f in fragments]
        kept = plan.kept.setdefault("elementwise", {})
        entry = kept.get((id(fragments), key))
        if entry is not None and entry[0] is fragments and all(map(operator.is_, map(dict.get, entry[1], itertools.repeat(key)), entry[2])):
            return entry[3]
        views = [f.elementwise_state(key) for f in fragments]
        holders = [f.state_holder(key) for f in fragments]
        kept[(id(fragments), key)] = (fragments, holders, [holder[key] for holder in holders], views)
        return views

    def batches_of(self, work: Work) -> list["Batch"]:
        """``batches(work, self.defaults)``; for the work of the step plan in use, made once and
        kept with it while the groups' shared hyperparameters stay as they were (a momentum
        scheduler may change ``betas`` between steps: O(groups) to check)."""
        plan = self._plan_in_use
        if plan is None or work is not plan.work:
            return batches(work, self.defaults)
        keys = [call_key(group, self.defaults) for group in self.param_groups]
        kept = plan.kept.get("batches")
        if kept is None or kept[0] != keys:
            kept = plan.kept["batches"] = (keys, batches(work, self.defaults))
        return kept[1]


_IS_SPARSE = operator.attrgetter("is_sparse")
_SHAPE = operator.attrgetter("shape")


def _grads_look_right(params: Sequence[Tensor]) -> bool:
    """Every gradient of ``params`` is dense, real floating point and shaped like its param
    (``None`` ones aside): the checks ``_check_before_step`` makes, as ``map``s over all
    params at once (no Python call per tensor: a step's host cost, issue 12)."""
    grads = list(map(_GRAD, params))
    if not all(map(operator.is_not, grads, itertools.repeat(None))):
        pairs = [(param, grad) for param, grad in zip(params, grads) if grad is not None]
        params, grads = [param for param, _ in pairs], [grad for _, grad in pairs]
    if any(map(_IS_SPARSE, grads)) or not all(map(_FLOAT_DTYPES.__contains__, map(_DTYPE, grads))):
        return False
    return list(map(_SHAPE, grads)) == list(map(_SHAPE, params))


def _placed_state(param: Tensor, value: Any, key: Any = None) -> Any:
    """A loaded state value as ``load_state_dict`` keeps it: tensors on the param's device,
    floating ones (``step`` aside, kept as saved, as torch keeps it) in ``state_dtype``; nested
    dicts (per-tensor state under ZeRO) likewise; anything else as it is."""
    if isinstance(value, Tensor):
        if key == "step":
            return value
        if value.is_floating_point():
            return value.to(dtype=state_dtype(param.dtype), device=param.device)
        return value.to(device=param.device)
    if isinstance(value, dict):
        return {k: _placed_state(param, v, k) for k, v in value.items()}
    return value


def _negate_grads_to_maximize(work: Work) -> list[tuple[Fragment, Tensor]]:
    """For groups with ``maximize=True``, hand the step ``-grad`` (as torch.optim does: the
    same step on the negated gradient, the mask included) in new tensors, one op for all;
    the user's gradients are untouched. Returns what to restore after the step."""
    flipped = [fragment for group, fragment in work if group.get("maximize")]
    if not flipped:
        return []
    restore = [(fragment, fragment.grad) for fragment in flipped]
    for fragment, negated in zip(flipped, torch._foreach_neg([fragment.grad for fragment in flipped])):
        fragment.grad = negated
    return restore


#: the hyperparameters a kernel call takes per tensor (``kernels.reference.PerTensor``): param
#: groups that differ only in these share one call per phase
PER_TENSOR_KEYS = ("lr", "weight_decay")


class Batch:
    """The fragments one kernel call per phase covers: one device (for the kernel dispatch), one
    state dtype (the batch's math runs in one dtype: fp32, or float64 for float64 params), and
    param groups that differ at most in ``PER_TENSOR_KEYS`` (the usual decay / no-decay split,
    per-layer learning rates), so a model's groups cost one call per phase, not one per group.

    ``group``: the first group (what every group of the batch shares); ``runs``: each group of
    the batch with its number of fragments, in fragment order."""

    __slots__ = ("group", "fragments", "runs")

    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group
        self.fragments: list[Fragment] = []
        self.runs: list[list[Any]] = []

    def add(self, group: dict[str, Any], fragment: Fragment) -> None:
        if self.runs and self.runs[-1][0] is group:
            self.runs[-1][1] += 1
        else:
            self.runs.append([group, 1])
        self.fragments.append(fragment)

    def per_tensor(self, key: str) -> PerTensor:
        """The group value of ``key`` (read now: schedulers change ``lr``), one number when every
        group of the batch has the same, else one per fragment."""
        values = [float(group[key]) for group, _ in self.runs]
        if values.count(values[0]) == len(values):
            return values[0]
        return list(itertools.chain.from_iterable(map(itertools.repeat, values, [count for _, count in self.runs])))


def call_key(group: dict[str, Any], defaults: dict[str, Any]) -> tuple[Any, ...]:
    """What must be equal for two param groups to share kernel calls: every hyperparameter the
    optimizer reads (its ``defaults`` keys) except ``PER_TENSOR_KEYS``, and whether the group
    runs the reference ops. Other keys a group carries (a name, a scheduler's ``initial_lr``)
    are not hyperparameters of the step and do not split it."""
    values = tuple(group.get(key) for key in defaults if key not in PER_TENSOR_KEYS)
    try:
        hash(values)
    except TypeError:  # an unhashable value (not one the checks make): the group steps alone
        return (id(group),)
    return (*values, reference_only(group))


def batches(work: Work, defaults: dict[str, Any]) -> list[Batch]:
    """The step's fragments in ``Batch``es, in order."""
    by_key: dict[tuple[Any, ...], Batch] = {}
    keys: dict[int, tuple[Any, ...]] = {}
    for group, fragment in work:
        key = keys.get(id(group))
        if key is None:
            key = keys[id(group)] = call_key(group, defaults)
        batch_key = (key, fragment.param.device, fragment.state_dtype)
        batch = by_key.get(batch_key)
        if batch is None:
            batch = by_key[batch_key] = Batch(group)
        batch.add(group, fragment)
    return list(by_key.values())


def kernels_for(fragments: Sequence[Fragment]) -> Any:
    """The kernel namespace for a batch of one device; the one the step plan checked, if any."""
    ops = fragments[0].ops
    return ops if ops is not None else ops_for(fragments[0].param.device)


def cautious_decay_options(batch: Batch) -> dict[str, bool]:
    """``{"cautious_weight_decay": True}`` for a batch whose decay is cautious and nonzero in
    some group (the reference ops' keyword), else nothing: with a zero decay the option changes
    nothing (a factor of exactly 1 where it applies)."""
    cautious = batch.group.get("cautious_weight_decay") and any(group["weight_decay"] for group, _ in batch.runs)
    return {"cautious_weight_decay": True} if cautious else {}


def kernels_for_group(group: dict[str, Any], fragments: Sequence[Fragment]) -> Any:
    """``kernels_for``, or the torch reference ops (``kernels.reference``, on any device) for a
    group that asks for what only they implement: cautious weight decay and amsgrad. The same
    math either way; the fused kernels are faster."""
    if reference_only(group):
        return reference
    return kernels_for(fragments)


def reduce_per_tensor(fragments: Sequence[Fragment], values: Tensor, reducer: BatchedReducer) -> None:
    """Register ``values[i]`` (one value per fragment ``i``) for reduction over fragment ``i``'s
    process group; whole local tensors (no group) are not reduced. One entry per process group:
    the whole tensor when every fragment shares that group (FSDP2, ZeRO), else its positions."""
    for group, index in _reduction_positions(fragments, values.device):
        reducer.add(group, values, index)


def _reduction_positions(fragments: Sequence[Fragment], device: torch.device) -> list[tuple[Any, Optional[Tensor]]]:
    """Per process group, the positions of its fragments (``None``: all of them), made once and
    kept on the batch's first fragment like ``batch_sizes``: no ``torch.tensor(list, device)``
    per step for a batch that mixes sharded and whole tensors."""
    cached = getattr(fragments[0], "reduction_positions", None)
    if cached is not None and cached[0] == len(fragments) and cached[1] == device:
        return cached[2]
    positions: dict[Any, list[int]] = {}
    for index, fragment in enumerate(fragments):
        if fragment.group is not None:
            positions.setdefault(fragment.group, []).append(index)
    made = [
        (group, None if len(indices) == len(fragments) else torch.tensor(indices, dtype=torch.long, device=device))
        for group, indices in positions.items()
    ]
    fragments[0].reduction_positions = (len(fragments), device, made)
    return made


def global_mask_scales(step_batches: list[Batch], local_counts: Callable[[dict[str, Any], list[Fragment]], Tensor]) -> list[Optional[Tensor]]:
    """The cautious mask's phase 1: local agreeing counts per fragment, completed over each
    fragment's process group in ONE reduction, turned into per-tensor scales
    ``1 / max(count / numel, 1e-3)``. ``None`` for groups with ``cautious=False``."""
    reducer = BatchedReducer()
    counts: list[Optional[Tensor]] = []
    for batch in step_batches:
        if not batch.group["cautious"]:
            counts.append(None)
            continue
        batch_counts = local_counts(batch.group, batch.fragments)
        reduce_per_tensor(batch.fragments, batch_counts, reducer)
        counts.append(batch_counts)
    reducer.all_reduce()
    return [
        None
        if batch_counts is None
        else kernels_for_group(batch.group, batch.fragments).mask_scales(batch_counts, batch_sizes(batch.fragments, batch_counts.device, batch_counts.dtype))
        for batch, batch_counts in zip(step_batches, counts)
    ]


def batch_sizes(fragments: Sequence[Fragment], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The whole-tensor sizes of ``fragments`` as a ``dtype`` tensor on ``device``, made once and
    kept on the batch's first fragment: a step plan reuses its fragments, in the same batches,
    step after step, so later steps copy nothing from the host (no ``torch.tensor(list,
    device=cuda)`` per step). Fragments built anew each step (ZeRO) make it anew, as before."""
    cached = getattr(fragments[0], "batch_sizes", None)
    if cached is not None and cached[0] == len(fragments) and cached[1].device == device and cached[1].dtype == dtype:
        return cached[1]
    sizes = torch.tensor([f.numel for f in fragments], dtype=dtype, device=device)
    fragments[0].batch_sizes = (len(fragments), sizes)
    return sizes
