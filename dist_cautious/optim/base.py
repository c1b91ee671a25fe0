"""What the three optimizers share: argument checks, and a step that works on fragments.

``step()`` checks every gradient and every group before touching anything (a step that raises
changes nothing), asks the fragment source for the local pieces of each param that has a
gradient, and hands them, with their group's hyperparameters, to the optimizer's phases in one
call, so that the partial sums of all groups share one reduction per phase.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from dist_cautious.kernels import ops_for
from dist_cautious.kernels.reference import mask_scales
from dist_cautious.shard.adapters import FragmentSource, default_fragments
from dist_cautious.shard.fragment import Fragment
from dist_cautious.shard.reducer import BatchedReducer

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
Work = list[tuple[dict[str, Any], Fragment]]


def check_lr(lr: Any, owner: str) -> None:
    if lr is None:
        raise ValueError(f"{owner}: lr is required")
    if isinstance(lr, Tensor):
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
    for index, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{owner}: betas[{index}] must be in [0, 1), got {beta!r}")
    return tuple(float(beta) for beta in betas)


def step_count(state: dict[str, Any]) -> int:
    """Advance and return the per-tensor step (kept in the state, never in the group:
    ZeRO-3 calls ``step()`` once per sub-group)."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
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
        self._owner = type(self).__name__
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

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
        for group in self.param_groups:
            self.check_hyperparameters(group)
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ValueError(f"{self._owner}: sparse gradients are not supported")
                if grad.is_complex() or grad.dtype not in _FLOAT_DTYPES:
                    raise TypeError(f"{self._owner}: gradients must be real floating point, got {grad.dtype}")
                if grad.shape != param.shape:
                    raise ValueError(f"{self._owner}: gradient shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimizer step over all param groups; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()
        work: Work = []
        for group in self.param_groups:
            fragments = self.fragment_source(group["params"], self.state)
            work.extend((group, fragment) for fragment in fragments if fragment.numel > 0)
        if work:
            self.step_fragments(work)
            for _, fragment in work:
                fragment.commit()
        return loss

    def step_fragments(self, work: Work) -> None:
        """The optimizer's phases over every (group, fragment) pair of this step."""
        raise NotImplementedError


def by_group(work: Work) -> list[tuple[dict[str, Any], list[Fragment]]]:
    """Fragments grouped by param group (and device, for the kernel dispatch), in order."""
    batches: dict[tuple[int, torch.device], tuple[dict[str, Any], list[Fragment]]] = {}
    for group, fragment in work:
        key = (id(group), fragment.param.device)
        batches.setdefault(key, (group, []))[1].append(fragment)
    return list(batches.values())


def kernels_for(fragments: Sequence[Fragment]) -> Any:
    return ops_for(fragments[0].param.device)


def global_mask_scales(
    batches: list[tuple[dict[str, Any], list[Fragment]]],
    local_counts: Callable[[dict[str, Any], list[Fragment]], Tensor],
) -> list[Optional[Tensor]]:
    """The cautious mask's phase 1: local agreeing counts per fragment, completed over each
    fragment's process group in ONE reduction, turned into per-tensor scales
    ``1 / max(count / numel, 1e-3)``. ``None`` for groups with ``cautious=False``."""
    reducer = BatchedReducer()
    counts: list[Optional[Tensor]] = []
    for group, fragments in batches:
        if not group["cautious"]:
            counts.append(None)
            continue
        batch_counts = local_counts(group, fragments)
        for index, fragment in enumerate(fragments):
            reducer.add(fragment.group, batch_counts[index : index + 1])
        counts.append(batch_counts)
    reducer.all_reduce()
    return [
        None if batch_counts is None else mask_scales(batch_counts, [f.numel for f in fragments])
        for (_, fragments), batch_counts in zip(batches, counts)
    ]
